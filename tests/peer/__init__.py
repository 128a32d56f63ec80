"""Peers' own pool test suites (CPython multiprocessing and concurrent.futures, mpire),
re-expressed against our pool. See README.md in this folder."""
