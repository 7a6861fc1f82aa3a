"""Keep freed memory in the process, so that CPU passes stop paying page faults.

A CPU forward pass or decoding step allocates and frees tensors of megabytes to tens of
megabytes (activations, key/value caches, logits). glibc's malloc serves such blocks with
``mmap`` and gives them back to the kernel when they are freed, or trims them off the top of
the heap, so the next pass touches fresh pages again: millions of page faults in a
``refdir run``, which cost most where pages are expensive to map (virtual machines). Raising
the ``mmap`` threshold and the trim threshold keeps those blocks in the heap for reuse.
Resident memory then stays at its high-water mark instead of shrinking between passes.

The command line calls :func:`keep_freed_memory` once at start-up; scripts may call it too.
``REFDIR_KEEP_FREED_MEMORY=0`` turns it off, and so does setting glibc's own
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Any

__all__ = ["keep_freed_memory"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the heap
_TRIM_THRESHOLD = 2**31 - 1  # trim the heap's top only past 2 GiB free (mallopt takes an int)

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory(libc: Any = None) -> bool:
    """Set glibc's malloc to keep freed blocks for reuse; True when it took effect.

    Nothing happens (False) off Linux, without glibc, when ``REFDIR_KEEP_FREED_MEMORY`` is
    ``0`` or when the user has set glibc's malloc options in the environment."""
    if os.environ.get("REFDIR_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    if libc is None:
        if not sys.platform.startswith("linux"):
            return False
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):  # another C library (musl) has no mallopt
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
    else:
        mallopt = libc.mallopt
    done = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
    log.debug("malloc keeps freed memory: %s", done)
    return done
