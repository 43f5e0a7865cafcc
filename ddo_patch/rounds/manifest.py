"""The round manager's one JSON file, and the small files its jobs leave in the run directories.

Every write goes to a temporary file beside the target, is fsynced, and replaces the target with
`os.replace`, so a reader (or a rerun after SIGKILL) sees the old or the new content, never half of it.
"""

from __future__ import annotations

import hashlib
import json
import os

from ddo_patch.files import write_atomic

MANIFEST = 'manifest.json'


def write_json(path, obj) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=1) + '\n').encode()), durable=True)


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
