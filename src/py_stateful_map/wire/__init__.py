"""The wire both sides share: messages, framing and pickling, shared memory, host copies.

Imported by the parent and by every worker, so it imports neither side.
"""
