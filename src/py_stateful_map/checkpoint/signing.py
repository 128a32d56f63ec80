"""Who wrote a pickle: HMAC-SHA256 signatures under a secret that only this user can read.

Most results are stored in a format that runs no code when read (``checkpoint.tagged``). The
rest — objects of the user's classes, the exceptions of failed items — are pickles, and
loading a pickle calls whatever it names. So each pickle a checkpoint stores is signed with a
key derived from a per-user secret, and it is loaded only when its signature matches (or the
reader says ``Checkpoint(..., trusted=True)``): a checkpoint file copied from elsewhere,
written by another user, or altered cannot make this user's process run code. Jupyter signs
the notebooks a user ran the same way, for the same reason.

The secret is 32 random bytes, in hex, in the first of:

- ``$PSM_CHECKPOINT_SECRET_FILE``;
- ``$XDG_DATA_HOME/py_stateful_map/checkpoint_secret``;
- ``~/.local/share/py_stateful_map/checkpoint_secret``.

It is created on the first signature (file mode 0600, a directory it creates 0700). Anyone
who can read it can sign a pickle this user will load, and anyone who can replace it can
make this user's signatures theirs: a secret that another user owns, or that the group or
others may read or write, is refused.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import stat
import threading
from pathlib import Path

from py_stateful_map.errors import CheckpointError

__all__ = ["SECRET_ENV", "SIGNATURE_SIZE", "check", "secret_path", "sign"]

SECRET_ENV = "PSM_CHECKPOINT_SECRET_FILE"
SIGNATURE_SIZE = 32
_PURPOSE = b"py_stateful_map checkpoint pickle v1"  # keys for other uses would differ
_MIN_SECRET = 16
#: Keys by the environment variables that locate their secret, so that one is read once.
_keys: dict[tuple[str | None, ...], bytes] = {}
_lock = threading.Lock()


def secret_path() -> Path:
    """Where this user's secret is (or will be), after the environment."""
    explicit = os.environ.get(SECRET_ENV)
    if explicit:
        return Path(explicit).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "py_stateful_map" / "checkpoint_secret"


def sign(data: bytes | memoryview) -> bytes:
    """The signature of ``data`` (creating this user's secret if there is none yet)."""
    key = _key(create=True)
    assert key is not None
    return hmac.digest(key, data, "sha256")


def check(signature: bytes, data: bytes | memoryview) -> str | None:
    """None when ``signature`` is this user's for ``data``; otherwise why not, in words."""
    key = _key(create=False)
    if key is None:
        return f"this user has no checkpoint secret ({secret_path()}) to check it with"
    if not hmac.compare_digest(signature, hmac.digest(key, data, "sha256")):
        return f"its signature is not one made with this user's secret ({secret_path()})"
    return None


def _key(*, create: bool) -> bytes | None:
    where = tuple(map(os.environ.get, (SECRET_ENV, "XDG_DATA_HOME", "HOME")))  # what path says
    key = _keys.get(where)
    if key is not None:
        return key
    path = secret_path()
    with _lock:
        secret = _read(path)
        if secret is None:
            if not create:
                return None
            _create(path)
            secret = _read(path)
            if secret is None:
                raise CheckpointError(f"the checkpoint secret {path} vanished as it was made")
        key = hmac.digest(secret, _PURPOSE, "sha256")
        _keys[where] = key
        return key


def _read(path: Path) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _secret_error(path, f"cannot be read ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise _secret_error(path, "is not a regular file")
        if info.st_uid != os.geteuid():
            raise _secret_error(path, f"belongs to another user (uid {info.st_uid})")
        if info.st_mode & 0o077:
            raise _secret_error(
                path,
                f"may be read or written by others (mode {stat.filemode(info.st_mode)}): "
                f"`chmod 600 {path}`",
            )
        secret = file.read().strip()
    if len(secret) < _MIN_SECRET:
        raise _secret_error(path, f"holds {len(secret)} bytes; a secret needs {_MIN_SECRET}")
    return secret


def _create(path: Path) -> None:
    """Write a new secret; atomic, and never replaces one made meanwhile (``link``)."""
    directory = path.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = directory / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(secrets.token_hex(32).encode("ascii") + b"\n")
                file.flush()
                os.fsync(file.fileno())
            with contextlib.suppress(FileExistsError):  # one made meanwhile is kept
                os.link(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as exc:
        raise _secret_error(
            path, f"cannot be created ({exc.strerror}); set {SECRET_ENV} to a file to use"
        ) from exc


def _secret_error(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"the checkpoint secret {path} {what}")
