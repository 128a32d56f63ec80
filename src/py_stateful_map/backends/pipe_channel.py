"""The parent's end of one worker's pipe: the only writer, and it never blocks.

A frame the pipe cannot take yet waits in an outbox and is flushed when ``poll`` says the pipe
is writable. A parent blocked writing a large chunk to a busy worker could not read the
results that worker (or another) is blocked writing — the classic two-way pipe deadlock.
Frames are laid out exactly as ``Connection.send_bytes`` does, so the child reads them with
``recv_bytes``.
"""

from __future__ import annotations

import select
import socket
import struct
from collections import deque
from multiprocessing.connection import Connection

from py_stateful_map.wire.serialization import Codec


class PipeChannel:
    """The parent's end of one worker's pipe, and its only writer.

    Every frame to the worker — chunks and ``Stop`` alike — goes through :meth:`enqueue`, so a
    frame is never written on top of a partly written one, and no write ever blocks: what the
    pipe cannot take now waits in the outbox until ``poll`` says the pipe is writable.
    """

    def __init__(self, conn: Connection, codec: Codec) -> None:
        self.conn = conn
        self.codec = codec
        self._sock: socket.socket | None = socket.socket(fileno=conn.fileno())  # MSG_DONTWAIT
        # ``Connection.poll()`` builds a selector per call (20 us); a poll object kept for the
        # pipe answers "anything to read?" in about 1 us, asked once per message received.
        self._readable = select.poll()
        self._readable.register(conn.fileno(), select.POLLIN)
        self._outbox: deque[memoryview] = deque()
        self.at_eof = False

    def readable(self) -> bool:
        """Whether the worker has sent something (or hung up) that ``recv_bytes`` would read."""
        return bool(self._readable.poll(0))

    @property
    def pending(self) -> bool:
        """Whether bytes wait for the pipe to become writable."""
        return bool(self._outbox)

    def enqueue(self, frame: bytes) -> None:
        self._outbox.append(memoryview(_connection_frame(frame)))
        if len(self._outbox) == 1:
            self.flush()

    def flush(self) -> None:
        """Write as much of the outbox as the pipe takes now, without blocking."""
        sock, outbox = self._sock, self._outbox
        while outbox and sock is not None:
            try:
                sent = sock.send(outbox[0], socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                outbox.clear()  # the worker died; its sentinel reports it, its chunks re-run
                return
            if sent == len(outbox[0]):
                outbox.popleft()
            else:
                outbox[0] = outbox[0][sent:]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.detach()  # the fd belongs to the Connection, which closes it
            self._sock = None
        self._outbox.clear()
        self.conn.close()
        self.codec.close()


_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!iQ")


def _connection_frame(frame: bytes) -> bytes:
    """Frame bytes exactly as ``Connection.send_bytes`` does, so the child can ``recv_bytes``."""
    if len(frame) > 0x7FFFFFFF:
        return _LONG.pack(-1, len(frame)) + frame
    return _SHORT.pack(len(frame)) + frame
