"""Ways to run workers: processes, threads, or inline in the caller's thread.

Every backend speaks the same small interface (``Backend``) so the scheduler above never
knows which one it drives.
"""
