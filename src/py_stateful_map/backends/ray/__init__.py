"""Workers as Ray actors: the driver's half (``driver``) and the actor's half (``actor``).

``codec`` is the one module both halves import: frames with Ray object references beside them.
Importing this package imports no Ray.
"""
