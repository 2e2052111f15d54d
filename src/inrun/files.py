"""Durable files: atomic writes, checksums, self-checking JSON and run-directory locks.

* :func:`atomic_write` writes to a temporary name in the same directory, flushes it to disk
  (``fsync``), renames it into place and syncs the directory, so a crash or ``kill -9`` leaves
  the old file or the new one, never half of one. Files are created with mode ``0o666`` less
  the process's umask, like any ordinary program's files (``tempfile.mkstemp`` would force
  ``0o600``).
* :func:`file_digest` / :func:`verify_file`: SHA-256 and size of a file, and the check that
  refuses a file whose bytes are not the ones written.
* :func:`write_json` / :func:`read_json`: JSON that carries the SHA-256 of its own canonical
  content under ``"checksum"``, so a flipped byte is detected while whitespace is irrelevant.
* :class:`DirLock`: an exclusive ``flock`` on a file, held for as long as a run trains. The
  kernel releases it when the process dies, even by ``kill -9``, so a lock is never stale; the
  file also records who holds it (pid, host, since when, command) for the error message of
  whoever is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import LedgerError, one_line

CHUNK = 1 << 20
CHECKSUM_KEY = "checksum"


class IntegrityError(LedgerError):
    """A file of a run or ledger is missing, damaged, or not the one that was written."""


class LockedError(LedgerError):
    """Another process holds the lock of a run directory."""

    def __init__(self, message: str, holder: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = dict(holder or {})


# -- writing ------------------------------------------------------------------------------------
def atomic_write(
    path: str | os.PathLike, write: Callable[[str], Any], fsync: bool = True, sync_dir: bool | None = None
) -> None:
    """Call ``write(tmp_path)`` then atomically rename the result to ``path``.

    The temporary file is created first (honouring the umask) so that writers which open the
    path themselves (``torch.save``, ``pyarrow``) keep its mode. On any error it is removed and
    the previous ``path``, if any, is left untouched.

    Args:
        fsync: flush the file to disk before the rename (durable, not only atomic).
        sync_dir: also sync the directory after the rename (default: as ``fsync``); a caller
            writing several files into one directory syncs it once at the end instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    try:
        write(str(tmp))
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        named = _naming(exc, path)
        if named is not None:
            raise named from exc
        raise
    if fsync if sync_dir is None else sync_dir:
        fsync_dir(path.parent)


def _naming(exc: BaseException, path: Path) -> OSError | None:
    """The error of a failed write, naming the file it was writing: writers that open the file
    themselves (pyarrow, ``torch.save``) report a full disk without the path, or as a
    ``RuntimeError`` of their own."""
    if isinstance(exc, OSError) and not exc.filename:
        return OSError(exc.errno or errno.EIO, exc.strerror or one_line(exc, 160), str(path))
    if isinstance(exc, RuntimeError) and "write" in str(exc).lower():
        full = shutil.disk_usage(path.parent).free < (1 << 20)
        return OSError(errno.ENOSPC if full else errno.EIO,
                       "No space left on device" if full else f"writing failed ({one_line(exc, 160)})", str(path))
    return None


def _fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and new entries in ``path`` durable (a no-op where directories have no fd)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src``'s bytes at ``dst`` atomically: a hard link (no copy) where the filesystem
    allows one, else a copy."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, tmp)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        import shutil

        try:
            shutil.copyfile(src, tmp)
            _fsync_file(tmp)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    os.replace(tmp, dst)


# -- checksums ----------------------------------------------------------------------------------
def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """``{"sha256": hex, "size": bytes}`` of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "size": size}


def verify_file(path: Path, digest: Mapping[str, Any], what: str) -> None:
    """Refuse ``path`` unless its size and SHA-256 are ``digest``'s.

    Raises:
        IntegrityError: the file is missing, not a file, or its bytes differ.
    """
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise IntegrityError(f"{path} is not a file ({what})")
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing ({what})") from None
    if size != digest.get("size"):
        raise IntegrityError(f"{path} is damaged: {size} bytes, {digest.get('size')} were written ({what})")
    if file_digest(path)["sha256"] != digest.get("sha256"):
        raise IntegrityError(f"{path} is damaged: its SHA-256 differs from the one recorded ({what})")


# -- self-checking JSON --------------------------------------------------------------------------
def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def json_text(obj: Mapping[str, Any]) -> str:
    """Indented JSON of ``obj`` with the SHA-256 of its canonical form under ``"checksum"``."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    return json.dumps({**body, CHECKSUM_KEY: hashlib.sha256(_canonical(body)).hexdigest()}, indent=2) + "\n"


def write_json(path: str | os.PathLike, obj: Mapping[str, Any], fsync: bool = True, sync_dir: bool | None = None) -> None:
    """Write :func:`json_text` of ``obj`` atomically (``fsync``, ``sync_dir``: see :func:`atomic_write`)."""
    text = json_text(obj)
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"), fsync=fsync, sync_dir=sync_dir)


def read_json(path: str | os.PathLike, what: str, require_checksum: bool = True) -> dict[str, Any]:
    """Read JSON written by :func:`write_json`, checking its checksum.

    Args:
        require_checksum: refuse a file without one (``False``: accept files of older formats).

    Raises:
        IntegrityError: missing, not UTF-8 JSON, not an object, or a checksum that differs.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing ({what})") from None
    except IsADirectoryError:
        raise IntegrityError(f"{path} is a directory, not a file ({what})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{path} is damaged: not valid JSON ({one_line(exc, 120)}) ({what})") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{path} is damaged: not a JSON object ({what})")
    stored = data.pop(CHECKSUM_KEY, None)
    if stored is None:
        if require_checksum:
            raise IntegrityError(f"{path} is damaged: it has no checksum ({what})")
        return data
    if hashlib.sha256(_canonical(data)).hexdigest() != stored:
        raise IntegrityError(f"{path} is damaged: its content does not match its checksum ({what})")
    return data


# -- locks ---------------------------------------------------------------------------------------
def _command() -> str:
    argv = [os.path.basename(sys.argv[0]) if sys.argv else "python", *sys.argv[1:]]
    text = " ".join(argv)
    return text if len(text) <= 200 else text[:199] + "…"


HOLDER_RECORD_WAIT_S = 2.0
"""How long a refused process waits for the lock's holder to record who it is: the holder writes
its record right after it takes the lock, and a refusal read in between would name nobody."""


class DirLock:
    """An exclusive, non-blocking ``flock`` on ``path`` (created if needed).

    Use as a context manager; :meth:`acquire` raises :class:`LockedError` naming the holder
    when another process (or another open of the same file) has it.
    """

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> DirLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = read_holder(self.path)
            deadline = time.monotonic() + HOLDER_RECORD_WAIT_S
            while not holder.get("pid") and time.monotonic() < deadline:
                time.sleep(0.01)  # the holder has the flock and is writing who it is
                holder = read_holder(self.path)
            raise LockedError(f"{self.what} is in use by {describe_holder(holder)}", holder) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": _command()}
        # The record is informational (the lock is the flock): rewrite it in place, no rename,
        # so the locked inode stays the one named by the path.
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_holder(holder: Mapping[str, Any]) -> str:
    if not holder.get("pid"):
        return "another process (it has not recorded who it is yet)"
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {holder['pid']} on {holder.get('host', '?')} since {when} (`{holder.get('command', '?')}`)"


def is_locked(path: Path) -> dict[str, Any] | None:
    """The holder record when another process holds the lock at ``path``, else ``None``."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return read_holder(path)
    finally:
        os.close(fd)
    return None


@contextlib.contextmanager
def shared_lock(path: Path) -> Iterator[None]:
    """A blocking shared ``flock`` while reading files a writer replaces under the exclusive
    one; nothing when the lock file does not exist (no writer ever ran there) or cannot be
    opened (a read-only copy)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """A blocking exclusive ``flock`` (the writer's side of :func:`shared_lock`)."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def utf8_text(raw: bytes, bad_byte: Callable[[int, int, int], Exception]) -> str:
    """``raw`` decoded as UTF-8; else ``bad_byte(line, column, byte)`` (1-based) is raised."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise bad_byte(line, column, raw[exc.start]) from None
