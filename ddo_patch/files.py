"""Crash-safe file writes, shared by every entry point that a rerun resumes from what it finds on disk."""

from __future__ import annotations

import os
from typing import BinaryIO, Callable


def write_atomic(path, write: Callable[[BinaryIO], object], durable: bool = False) -> None:
    """Fill `path` through `write(f)` so that a reader, or a rerun after a SIGKILL, sees the old content or
    the new one, never half a file: the bytes go to a temporary file beside `path` (same file system),
    which then replaces it with `os.replace`. `durable` also fsyncs the file and the rename (for records
    that must survive a power cut, like the round manifest). Missing parent folders are created.
    """
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if durable:
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
