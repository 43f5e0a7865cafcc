"""The files of an EDM2 run directory, named once for the commands that write and read them and for the
round manager's backend. Pure Python: importable without an EDM2 checkout.

Upstream's training loop writes `network-snapshot-<kimg>-<ema std>.pkl`, `training-state-<kimg>.pt`
and `stats.jsonl`; `edm2_ext.evaluate` writes the evaluation report (`eval.json` in the manager's runs).
"""

from __future__ import annotations

import os
import re

from ddo_patch.errors import DDOPatchError

SNAPSHOT_PATTERN = re.compile(r'network-snapshot-(\d+)(-[\d.]+)?\.pkl')
STATS = 'stats.jsonl'
EVALUATION = 'eval.json'
OPTIONS = 'training_options.json'


def snapshot_kimg(name: str) -> int:
    """The training progress (kimg) in a snapshot's file name."""
    return int(SNAPSHOT_PATTERN.fullmatch(os.path.basename(name)).group(1))


def training_state(kimg: int) -> str:
    return f'training-state-{kimg:07d}.pt'


def list_snapshots(path: str) -> list:
    """`path` itself, or the network snapshots in run directory `path` in training order."""
    if not os.path.isdir(path):
        return [path]
    names = sorted((n for n in os.listdir(path) if SNAPSHOT_PATTERN.fullmatch(n)), key=lambda n: (snapshot_kimg(n), n))
    if not names:
        raise DDOPatchError(f'no network-snapshot-*.pkl in {path}; give a snapshot or a run directory of edm2_ext.train')
    return [os.path.join(path, n) for n in names]
