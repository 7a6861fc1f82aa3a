"""Files that are never left half-written: every file goes through a temporary path beside it
and is renamed into place, every folder of results through a temporary folder; and one-line
errors for folders that cannot be made or written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from refdir.errors import RefdirError

__all__ = [
    "atomic_folder",
    "atomic_path",
    "file_mode",
    "make_folder",
    "output_folder",
    "writable_folder",
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
    return RefdirError(f"cannot write in {path} ({exc.strerror or exc}); give another path")


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
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only on success."""
    make_folder(target.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise _cannot_write(target.parent, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes it 0600: give the usual permissions
            tmp_path.chmod(file_mode())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_folder(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; it becomes ``target`` only on success.

    ``target`` must not exist or be an empty folder, unless ``replace``: then an existing one
    is swapped out and removed once the new one is in place."""
    make_folder(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as exc:
        raise _cannot_write(target.parent, exc) from None
    try:
        yield tmp
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and some writers make 0700 / 0600
            path.chmod(folder_mode() if path.is_dir() else file_mode())
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        if replace and target.exists():
            os.replace(target, old)
        elif target.exists():
            target.rmdir()  # only an empty one
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any, sort_keys: bool = False) -> None:
    """``data`` as indented JSON, through a temporary file."""
    write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def write_jsonl(path: Path, records: Sequence[Any]) -> None:
    """One JSON value per line, through a temporary file."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))
