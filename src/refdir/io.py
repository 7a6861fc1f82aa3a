"""Files that are never left half-written: every file goes through a temporary path beside it
and is renamed into place, every folder of results through a temporary folder; and one-line
errors for folders that cannot be made or written, for a full disk and for the process's
file-size limit, both when they happen and, checked before long work, when they would.

Temporary names carry the process id and a tag of the host (``.NAME.tmp-PID-HOST-XXXX``): a
process killed before it could remove its own (SIGKILL, a power cut) leaves them behind, and
the next write to the same target removes those of processes that are gone."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from refdir.errors import RefdirError

__all__ = [
    "atomic_folder",
    "atomic_path",
    "check_room",
    "defer_signal",
    "file_mode",
    "file_size_limit",
    "full_disk_error",
    "make_folder",
    "output_folder",
    "remove_stale",
    "signals_held",
    "writable_folder",
    "write_bytes",
    "write_json",
    "write_jsonl",
    "write_text",
]


def file_mode() -> int:
    """The permissions a new file gets under the current umask (temporary files get 0600)."""
    current = os.umask(0)
    os.umask(current)
    return 0o666 & ~current


def folder_mode() -> int:
    """The permissions a new folder gets: a file's, searchable wherever readable."""
    mode = file_mode()
    return mode | (mode & 0o444) >> 2


def make_folder(path: Path) -> Path:
    """Create the folder ``path`` (and its parents); a one-line error where that cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RefdirError(f"{path} exists and is not a folder; give a folder path") from None
    except OSError as exc:
        raise RefdirError(
            f"cannot create the folder {path} ({exc.strerror or exc}); give another path"
        ) from None
    return path


def _cannot_write(path: Path, exc: OSError) -> RefdirError:
    full = full_disk_error(path, exc)
    if full is not None:
        return full
    return RefdirError(f"cannot write in {path} ({exc.strerror or exc}); give another path")


_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
"""How a Rust writer (safetensors, tokenizers) reports an OS error in its message."""


def _os_errno(exc: BaseException) -> int | None:
    """The errno of ``exc``, or of the exception it was raised from or during; a Rust writer's
    error carries it only in its message (``... (os error 28)``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno
        found = _RUST_OS_ERROR.search(str(current))
        if found:
            return int(found.group(1))
        current = current.__cause__ or current.__context__
    return None


def _size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def file_size_limit() -> int | None:
    """The largest file this process may write (``ulimit -f``, RLIMIT_FSIZE), None if unlimited.
    Python ignores SIGXFSZ, so a write past it fails with EFBIG instead of killing the process."""
    try:
        import resource  # POSIX only: no limit to respect elsewhere
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _too_large(path: Path, size: str | None = None) -> RefdirError:
    limit = file_size_limit()
    what = f"{path} (about {size})" if size else str(path)
    cap = f"{_size(limit)}, " if limit is not None else ""
    return RefdirError(
        f"{what} would exceed the file-size limit of this process ({cap}`ulimit -f`); raise "
        "the limit (`ulimit -f unlimited`) and run again"
    )


def full_disk_error(path: Path, exc: BaseException) -> RefdirError | None:
    """The one-line error for ``exc`` if writing ``path`` failed for a full disk (ENOSPC), an
    exhausted quota (EDQUOT) or the file-size limit (EFBIG), including the errors of writers in
    Rust (safetensors, tokenizers) that carry the OS error in their message; else None."""
    code = _os_errno(exc)
    if code not in _FULL:
        return None
    if code == errno.EFBIG:
        return _too_large(path)
    if code == errno.ENOSPC:
        return RefdirError(f"no space left to write {path}; free space or give another folder")
    return RefdirError(f"disk quota exceeded writing {path}; free space or give another folder")


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (what a disk's free space can be asked of)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_room(target: Path, total: int, largest: tuple[Path, int] | None = None) -> None:
    """A one-line error now, before long work, unless ``total`` bytes fit on the disk that
    ``target`` (a file or a folder) goes to, and the process's file-size limit allows its
    largest file, ``largest`` (its path and bytes; default: ``target``, of ``total`` bytes).
    The sizes are the caller's estimates, margins included."""
    biggest, size = largest if largest is not None else (target, total)
    limit = file_size_limit()
    if limit is not None and size > limit:
        raise _too_large(biggest, _size(size))
    try:
        free = shutil.disk_usage(_existing(target)).free
    except OSError:  # nothing to tell: the writes will say it if it does not fit
        return
    if total > free:
        raise RefdirError(
            f"no space left to write {target}: it needs about {_size(total)}, "
            f"{_size(free)} is free there; free space or give another folder"
        )


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
"""A tag of this machine in temporary names: a folder shared between machines holds temporary
files of processes that this machine cannot see, which are never taken for stale."""


def _temporary_prefix(target: Path, kind: str = "tmp") -> str:
    return f".{target.name}.{kind}-{os.getpid()}-{_HOST}-"


def _process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (signal 0 asks without sending one)."""
    if pid == os.getpid() or os.name == "nt":  # on Windows os.kill(pid, 0) would end it
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it exists, as another user's
        return False
    return False


def remove_stale(target: Path) -> None:
    """Remove the temporary siblings of ``target`` (``.NAME.tmp-PID-HOST-...``) left by
    processes of this machine that are gone; a folder set aside while it was being replaced
    (``.NAME.old-PID-HOST-``) goes back in place if ``target`` never came."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)-{_HOST}-")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        found = pattern.match(entry.name)
        if found is None or not _process_gone(int(found.group(2))):
            continue
        path = Path(entry.path)
        try:
            if found.group(1) == "old" and not os.path.lexists(target):
                os.replace(path, target)  # the swap was cut between its two renames
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except OSError:  # removed by another process at the same time, or not ours to remove
            continue


def writable_folder(path: Path) -> Path:
    """:func:`make_folder`, then a one-line error unless a file can be created in it (checked
    before long work whose results go there)."""
    make_folder(path)
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".refdir-probe.")
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    os.close(fd)
    os.unlink(probe)
    return path


@contextmanager
def output_folder(path: Path) -> Iterator[Path]:
    """:func:`writable_folder` for the work inside the block: the folder is made and checked
    now, and the folders it had to make are removed again if the block fails and leaves them
    empty (a failed command leaves no empty output folder behind)."""
    path = Path(os.path.abspath(path))  # "new/../x" must not make "new" on the way
    made = [p for p in (path, *path.parents) if not p.exists()]  # innermost first
    writable_folder(path)
    try:
        yield path
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()  # only an empty folder
            except OSError:
                break
        raise


@contextmanager
def _full_disk_in_one_line(target: Path) -> Iterator[None]:
    """A full disk or the file-size limit, met in the block while writing ``target``, as a
    one-line error."""
    try:
        yield
    except Exception as exc:
        full = full_disk_error(target, exc)
        if full is not None:
            raise full from None
        raise


_HELD = [0]
_PENDING: list[Callable[[], None]] = []


@contextmanager
def signals_held() -> Iterator[None]:
    """A block that a signal does not cut: the command line's SIGINT and SIGTERM handlers
    (:func:`defer_signal`) wait until it ends, so that a temporary file made and recorded, or
    removed, in the block cannot be left behind by a signal that lands between the two."""
    _HELD[0] += 1
    try:
        yield
    finally:
        _HELD[0] -= 1
        if _HELD[0] == 0 and _PENDING:
            action = _PENDING[0]
            _PENDING.clear()
            action()


def defer_signal(action: Callable[[], None]) -> bool:
    """For a signal handler: inside :func:`signals_held`, keep ``action`` (what the handler
    would do: raise) for the block's end and return True; outside, return False."""
    if _HELD[0] > 0:
        _PENDING.append(action)
        return True
    return False


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only on success.
    A full disk or the file-size limit, met while writing it, is a one-line error."""
    make_folder(target.parent)
    remove_stale(target)
    tmp_path: Path | None = None
    try:
        with signals_held():  # made and recorded, or not made: never made and forgotten
            try:
                fd, tmp = tempfile.mkstemp(
                    dir=target.parent, prefix=_temporary_prefix(target), suffix=".tmp"
                )
            except OSError as exc:
                raise _cannot_write(target.parent, exc) from None
            tmp_path = Path(tmp)
            os.close(fd)
        with _full_disk_in_one_line(target):
            yield tmp_path
        if tmp_path.exists():  # mkstemp makes it 0600: give the usual permissions
            tmp_path.chmod(file_mode())
        os.replace(tmp_path, target)
    finally:
        with signals_held():
            if tmp_path is not None:
                tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_folder(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it becomes ``target`` only on success.

    ``target`` must not exist or be an empty folder, unless ``replace``: then an existing one
    is swapped out and removed once the new one is in place. A full disk or the file-size
    limit, met while writing into it, is a one-line error."""
    make_folder(target.parent)
    remove_stale(target)
    tmp: Path | None = None
    try:
        with signals_held():
            try:
                tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temporary_prefix(target)))
            except OSError as exc:
                raise _cannot_write(target.parent, exc) from None
        with _full_disk_in_one_line(target):
            yield tmp
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and some writers make 0700 / 0600
            path.chmod(folder_mode() if path.is_dir() else file_mode())
        old = target.parent / f"{_temporary_prefix(target, 'old')}{os.urandom(4).hex()}"
        if replace and target.exists():
            os.replace(target, old)
        elif target.exists():
            target.rmdir()  # only an empty one
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        with signals_held():
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Path, data: Any, sort_keys: bool = False) -> None:
    """``data`` as indented JSON, through a temporary file."""
    write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def write_jsonl(path: Path, records: Sequence[Any]) -> None:
    """One JSON value per line, through a temporary file."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))
