"""Tiny EDM2 runs on the CPU, shared by the integration tests: subprocesses as users run them, a synthetic
labelled data set in EDM2's format, and a short MLE run of the upstream training loop as the pretrained model."""

import json
import os
import subprocess
import sys

import numpy as np

from ddo_patch.rounds_example import MLE_SCRIPT  # the tiny upstream MLE run, shared with `rounds example`

TESTS = os.path.dirname(os.path.abspath(__file__))
CLASSES, RES = 4, 8


def subprocess_env(edm2_root):
    """One CPU thread per process (much faster on a shared machine than torch's default); helpers importable."""
    return dict(os.environ, OMP_NUM_THREADS='1', EDM2_ROOT=str(edm2_root), PYTHONPATH=TESTS)


def run(args, edm2_root, cwd, check=True):
    """`python ARGS` as users run it; raises with the output's tail when it fails (unless check=False)."""
    proc = subprocess.run([sys.executable] + args, cwd=cwd, env=subprocess_env(edm2_root), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f'{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def write_dataset(path, n=64, classes=CLASSES, res=RES, labels=True, latent=False):
    """Images whose colour depends on the class, with labels in dataset.json, as upstream dataset_tool writes:
    uint8 PNGs, or (latent) 8-channel float32 VAE mean/std moments in img-mean-std-*.npy."""
    import PIL.Image
    rng = np.random.RandomState(0)
    os.makedirs(path)
    entries = []
    for i in range(n):
        if latent:
            name = f'{i:05d}/img-mean-std-{i:08d}.npy'
            moments = np.concatenate([rng.randn(4, res, res) * 3 + i % classes, np.full([4, res, res], 0.1)])
            os.makedirs(os.path.join(path, os.path.dirname(name)), exist_ok=True)
            np.save(os.path.join(path, name), moments.astype(np.float32))
        else:
            colour = np.array([60.0, 30.0, 15.0]) * (1 + i % classes)
            name = f'{i:05d}.png'
            PIL.Image.fromarray(np.clip(rng.randn(res, res, 3) * 30 + colour, 0, 255).astype(np.uint8), 'RGB').save(os.path.join(path, name))
        entries.append([name, i % classes])
    if labels:
        with open(os.path.join(path, 'dataset.json'), 'w') as f:
            json.dump({'labels': entries}, f)
    return str(path)




def train_mle_snapshot(data, run_dir, edm2_root, encoder='training.encoders.StandardRGBEncoder'):
    """A 1Ki-image MLE run of upstream's training loop on `data`; returns its snapshot (the tests' pretrained net)."""
    os.makedirs(run_dir)
    run(['-c', MLE_SCRIPT, str(data), str(run_dir), encoder], edm2_root, run_dir)
    return os.path.join(run_dir, 'network-snapshot-0000001-0.100.pkl')
