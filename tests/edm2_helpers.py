"""Tiny EDM2 runs on the CPU, shared by the integration tests: subprocesses as users run them, on the tiny world
of `edm2_ext.example` (its data set writer, its MLE run of upstream's training loop, its pixel-projection detector)."""

import os
import subprocess
import sys

from edm2_ext.example import CLASSES, RESOLUTION as RES, pretrain_tiny, write_dataset  # noqa: F401 (re-exported)

TESTS = os.path.dirname(os.path.abspath(__file__))


def subprocess_env(edm2_root):
    """One CPU thread per process (much faster on a shared machine than torch's default); helpers importable."""
    return dict(os.environ, OMP_NUM_THREADS='1', EDM2_ROOT=str(edm2_root), PYTHONPATH=TESTS)


def run(args, edm2_root, cwd, check=True):
    """`python ARGS` as users run it; raises with the output's tail when it fails (unless check=False)."""
    proc = subprocess.run([sys.executable] + args, cwd=cwd, env=subprocess_env(edm2_root), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def train_mle_snapshot(data, run_dir, edm2_root):
    """The tiny MLE run on `data` (`python -m edm2_ext.pretrain`); returns its snapshot (the tests' pretrained net)."""
    return pretrain_tiny(data, run_dir, edm2_root, env=subprocess_env(edm2_root))
