"""Crash-safe writes of files and whole directories.

Everything is written under a temporary name, made durable (``fsync`` of the file, then of the
directory that holds it), and only then renamed to its real name; a rename within one directory
is atomic on POSIX. So a real name only ever refers to a complete version, whatever sequence of
crashes (``kill -9``, power loss) interrupts the writes.

Temporary entries are named ``.{name}.{token}.tmp`` beside their target. Each is a directory that
its writer holds an exclusive ``flock`` on for as long as it lives; the kernel drops the lock when
the writer dies, so :func:`remove_stale_temps` can tell a dead writer's leftovers (removed) from a
live writer's work (kept). The next write of the same name, and :func:`latest_version`'s callers
at start-up, clean them.

A directory (:func:`atomic_dir`) cannot be renamed over a non-empty one, so replacing
``path`` takes two renames; the protocol keeps the last complete version on disk at every
instant::

    1. build and fsync the new version in .{name}.{token}.tmp
    2. if path exists: discard .{name}.old (path is complete and newer), rename path -> .{name}.old
    3. rename the new version -> path, fsync the parent
    4. discard .{name}.old

"Discard" renames a directory to a temporary name before deleting it, so a deletion cut short
never leaves a half directory under a real name. Between 2 and 3 only ``.{name}.old`` exists;
:func:`latest_version` returns ``path`` when present, else ``.{name}.old``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

try:  # POSIX; elsewhere every temporary entry counts as stale (one writer per directory)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

TEMP_SUFFIX = ".tmp"
ASIDE_SUFFIX = ".old"
# our temporary names, and mkstemp's of earlier versions: .{name}.{token}.tmp
_TEMP_TOKEN = r"\.[A-Za-z0-9_]{6,}" + re.escape(TEMP_SUFFIX)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (created or truncated) and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to the disk (a file written by other code, e.g. safetensors)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` (creations, renames, deletions) durable."""
    if os.name == "nt":  # pragma: no cover - directories cannot be opened there
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot sync a directory; their renames are then as durable as it gets
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then each directory after its entries."""
    for here, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(os.path.join(here, name))
        fsync_dir(here)


def _try_lock(path: Path) -> int | None:
    """An fd of ``path`` holding an exclusive flock, or ``None`` when a live process holds it.

    Raises ``FileNotFoundError`` when ``path`` is gone. Without ``fcntl``, or on a file system
    without ``flock``, the lock always succeeds.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    if fcntl is None:  # pragma: no cover
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # a file system without flock (some network mounts): one writer per directory is assumed
        pass
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing drops the flock


def _temp_name(parent: Path, name: str) -> Path:
    return parent / f".{name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"


def _new_temp_dir(parent: Path, name: str) -> tuple[Path, int | None]:
    """Create ``.{name}.{token}.tmp`` in ``parent`` and lock it; returns (path, lock fd)."""
    while True:
        tmp = _temp_name(parent, name)
        os.mkdir(tmp, 0o777)  # the umask applies, as for any directory
        try:
            fd = _try_lock(tmp)
        except FileNotFoundError:  # a cleaner took it for stale in the instant before the lock
            continue
        if fd is None:
            continue
        try:
            if os.fstat(fd).st_ino == os.stat(tmp).st_ino:
                return tmp, fd
        except FileNotFoundError:
            pass
        _unlock(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        os.unlink(path)


def remove_stale_temps(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporary entries of writers that died in ``directory``; returns what was removed.

    ``name`` limits it to the temporaries of one target (``.{name}.{token}.tmp``); ``None`` takes
    every one. An entry whose writer is alive (it holds the entry's lock) is kept.
    """
    directory = Path(directory)
    pattern = re.compile(r"\." + (re.escape(name) if name is not None else r".+") + _TEMP_TOKEN)
    removed = []
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            fd = _try_lock(entry)
        except FileNotFoundError:
            continue
        except OSError:  # O_NOFOLLOW refuses a symlink, which no writer of ours creates
            if entry.is_symlink():
                os.unlink(entry)
                removed.append(entry)
            continue
        if fd is None:
            continue
        try:
            _remove(entry)
            removed.append(entry)
        except FileNotFoundError:  # another process (a DDP rank at start-up) removed it under the lock first
            pass
        finally:
            _unlock(fd)
    return removed


def aside_path(path: str | os.PathLike) -> Path:
    """Where :func:`atomic_dir` keeps the previous version of ``path`` for an instant."""
    path = Path(path)
    return path.parent / f".{path.name}{ASIDE_SUFFIX}"


def latest_version(path: str | os.PathLike) -> Path | None:
    """The complete version of a directory written by :func:`atomic_dir`: ``path``, else its aside copy."""
    path = Path(path)
    for candidate in (path, aside_path(path)):
        if candidate.is_dir():
            return candidate
    return None


def _discard(path: Path) -> None:
    """Delete directory ``path``: first renamed to a temporary name, so no cut-short deletion keeps its name."""
    fd = _try_lock(path)
    if fd is None:  # another process is discarding it
        return
    try:
        trash = _temp_name(path.parent, path.name.lstrip(".").removesuffix(ASIDE_SUFFIX))
        os.rename(path, trash)
        fsync_dir(path.parent)
        shutil.rmtree(trash)
    finally:
        _unlock(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for ``path``; on success it is made durable and renamed onto ``path``.

    The temporary file sits alone in a locked ``.{name}.{token}.tmp`` directory and keeps
    ``path``'s file name (so writers that pick a format by extension, or that write their own
    temporary file beside it, as safetensors does, work unchanged).
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(parent, path.name)
    tmp_dir, lock = _new_temp_dir(parent, path.name)
    try:
        tmp = tmp_dir / path.name
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"atomic_path: the caller wrote nothing to {tmp} (for {path})")
        # After the caller: safetensors replaces the file with its own 0600 temporary file.
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(parent)
        os.rmdir(tmp_dir)
    finally:
        try:
            if os.path.lexists(tmp_dir):
                shutil.rmtree(tmp_dir)
        finally:
            _unlock(lock)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably."""
    with atomic_path(path) as tmp:
        write_file(tmp, data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``path`` as a whole.

    The protocol (module docstring) never deletes the last complete version before its
    successor is durable under its real name. Stale temporaries of ``path`` are removed first.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(parent, path.name)
    tmp, lock = _new_temp_dir(parent, path.name)
    try:
        yield tmp
        _fsync_tree(tmp)
        aside = aside_path(path)
        if os.path.lexists(path):
            if os.path.lexists(aside):  # path is complete and newer; the aside copy is an older one
                _discard(aside)
            os.rename(path, aside)
            fsync_dir(parent)
        os.rename(tmp, path)
        fsync_dir(parent)
        if os.path.lexists(aside):
            _discard(aside)
    finally:
        try:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp)
        finally:
            _unlock(lock)
