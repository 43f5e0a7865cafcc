"""The round manager's one JSON file, and the small files its jobs leave in the run directories.

Every write goes to a temporary file beside the target, is fsynced, and replaces the target with
`os.replace`, so a reader (or a rerun after SIGKILL) sees the old or the new content, never half of it.
"""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST = 'manifest.json'


def write_json(path, obj) -> None:
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
        f.write('\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)   # make the rename itself durable
    finally:
        os.close(directory)


def read_json(path, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def sha256(path) -> str | None:
    """Content hash of a file (None for a URL); read in 16 MiB blocks."""
    if '://' in str(path):
        return None
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(16 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def load(workdir) -> dict | None:
    return read_json(os.path.join(workdir, MANIFEST))


def save(workdir, manifest: dict) -> None:
    write_json(os.path.join(workdir, MANIFEST), manifest)
