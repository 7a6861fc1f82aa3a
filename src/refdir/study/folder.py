"""A run folder as a place: a run takes a new or empty folder, or one that is already a run
folder (its marker, ``refdir-run.json``, or a ``config.json`` of refdir 0.1.0), and refuses
anything else; one run at a time works in it (a file lock); and a run that fails before any
step finished in a folder it made leaves nothing behind."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import filelock

from refdir import __version__
from refdir.artifacts.run import ConfigRecord, RunMarker
from refdir.errors import RefdirError
from refdir.study.config import CONFIG_TOML

__all__ = ["LOCK", "claim", "forget", "locked", "mark"]

LOCK = ".refdir-run.lock"
"""The lock file one run holds in its folder while it works."""


def _is_run_folder(out: Path) -> bool:
    if (out / RunMarker.FILE).is_file():
        return True
    try:  # a run folder of refdir 0.1.0 has no marker, but its own config.json
        ConfigRecord.read(out)
    except RefdirError:
        return False
    return True


def claim(out: Path) -> bool:
    """Whether ``out`` is new: it does not exist or is empty (True), or it is a run folder
    (False). Any other folder, or a file, is refused in one line: a run never writes into
    another program's files."""
    if not out.exists():
        return True
    if not out.is_dir():
        raise RefdirError(f"{out} exists and is not a folder; give `out` a new folder")
    held = sorted(p.name for p in out.iterdir() if p.name != LOCK)
    if not held:
        return True
    if _is_run_folder(out):
        return False
    shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
    raise RefdirError(
        f"{out} is not a refdir run folder (it holds {shown}); give `out` a new or empty "
        "folder, or the folder of an earlier run"
    )


def mark(out: Path) -> None:
    """Make ``out`` a run folder (once)."""
    if not (out / RunMarker.FILE).is_file():
        RunMarker(created_by=f"refdir {__version__}").write(out)


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold the run folder's lock for the block; a one-line error at once if another run
    holds it."""
    lock = filelock.FileLock(out / LOCK, timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RefdirError(
            f"{out} is in use by another refdir run; wait for it to end, or give another "
            "`out` folder"
        ) from None
    try:
        yield
    finally:
        lock.release()


def forget(out: Path, made: list[Path]) -> None:
    """Remove what a run that failed before any step finished wrote into a folder that was new:
    its records, and the folders it made (``made``, innermost first) if they are empty then."""
    for name in (ConfigRecord.FILE, CONFIG_TOML, RunMarker.FILE, "timings.json", LOCK):
        (out / name).unlink(missing_ok=True)
    for folder in made:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        else:
            break
