"""The parent side of the pool: one ``map()`` from the caller's input to the caller's results.

Everything here runs in the caller's process and steers workers; nothing here runs inside one.
See :mod:`py_stateful_map.core.map_run` for the data path and the module of each step.
"""
