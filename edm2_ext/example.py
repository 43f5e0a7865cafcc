"""A tiny EDM2 world for trying the round manager on a CPU in minutes, and the tests' EDM2 fixtures.

    python -m edm2_ext.example DIR

    DIR/data/             64 labelled 8x8 RGB images in EDM2's data set layout (4 classes, colour by class)
    DIR/mle/network-snapshot-0000001-0.100.pkl   a tiny EDM2 UNet trained on them by upstream's own loop
    DIR/stats.pkl         reference statistics of the data for `PixelProjection` (an offline stand-in for Inception)

The MLE run is `python -m edm2_ext.pretrain` in a subprocess (one CPU thread), as a user would run it.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import click
import numpy as np
import torch

from ddo_patch.errors import DDOPatchError, exit_on_user_error

CLASSES, RESOLUTION, IMAGES = 4, 8, 64
PRETRAINED = 'network-snapshot-0000001-0.100.pkl'
# The tiny MLE run: 1Ki images of a 16-channel, two-resolution UNet at a high learning rate.
TINY_MLE = ['--channels', '16', '--channel-mult', '1,2', '--blocks', '1', '--attn', '4', '--duration', '1Ki', '--batch', '16',
            '--lr', '1e-2', '--ema-std', '0.1', '--snapshot', '1Ki', '--workers', '0']


class PixelProjection:
    """A feature detector for `edm2_ext.evaluate --detector fid=edm2_ext.example:PixelProjection`:
    a fixed random projection of 8x8 RGB pixels (uint8 NCHW -> [N, 8]); no download, instant."""
    feature_dim = 8

    def __init__(self):
        self.proj = torch.randn([3 * RESOLUTION * RESOLUTION, self.feature_dim], dtype=torch.float64,
                                generator=torch.Generator().manual_seed(0))

    def __call__(self, images):
        return (images.to(torch.float64).flatten(1) / 255) @ self.proj.to(images.device)


def tiny_images(n=IMAGES, classes=CLASSES, res=RESOLUTION):
    """uint8 NHWC images whose colour depends on the class, and their labels (class of image i = i % classes)."""
    rng = np.random.RandomState(0)
    labels = np.arange(n) % classes
    colours = np.array([60.0, 30.0, 15.0]) * (1 + labels[:, None])
    images = np.clip(rng.randn(n, res, res, 3) * 30 + colours[:, None, None, :], 0, 255).astype(np.uint8)
    return images, labels


def write_dataset(path, n=IMAGES, classes=CLASSES, res=RESOLUTION, labels=True, latent=False) -> str:
    """`tiny_images` in EDM2's data set layout, as upstream dataset_tool writes it: uint8 PNGs, or (latent) 8-channel
    float32 VAE mean/std moments in img-mean-std-*.npy, with the labels in dataset.json (unless labels=False)."""
    import PIL.Image
    os.makedirs(path)
    images, classes_of = tiny_images(n, classes, res)
    rng = np.random.RandomState(0)
    entries = []
    for i, (image, c) in enumerate(zip(images, classes_of)):
        if latent:
            name = f'{i:05d}/img-mean-std-{i:08d}.npy'
            moments = np.concatenate([rng.randn(4, res, res) * 3 + c, np.full([4, res, res], 0.1)])
            os.makedirs(os.path.join(path, os.path.dirname(name)), exist_ok=True)
            np.save(os.path.join(path, name), moments.astype(np.float32))
        else:
            name = f'{i:05d}.png'
            PIL.Image.fromarray(image, 'RGB').save(os.path.join(path, name))
        entries.append([name, int(c)])
    if labels:
        with open(os.path.join(path, 'dataset.json'), 'w') as f:
            json.dump({'labels': entries}, f)
    return str(path)


def write_stats(path):
    """Upstream's reference-statistics format, {metric: {mu, sigma}}, of the data under PixelProjection."""
    images, _ = tiny_images()
    features = PixelProjection()(torch.as_tensor(images).permute(0, 3, 1, 2)).numpy()
    with open(path, 'wb') as f:
        pickle.dump({'fid': dict(mu=features.mean(0), sigma=np.cov(features, rowvar=False))}, f)


def pretrain_tiny(data, run_dir, edm2_root=None, env=None) -> str:
    """The tiny MLE run on `data` (a subprocess of `edm2_ext.pretrain`); returns its snapshot."""
    env = dict(env or os.environ, OMP_NUM_THREADS='1', **({'EDM2_ROOT': str(edm2_root)} if edm2_root else {}))
    proc = subprocess.run([sys.executable, '-m', 'edm2_ext.pretrain', '--data', str(data), '--outdir', str(run_dir)] + TINY_MLE,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DDOPatchError(f'the tiny MLE run failed: {(proc.stderr.strip().splitlines() or ["no output"])[-1]}')
    return os.path.join(run_dir, PRETRAINED)


def make_example(directory, edm2_root=None) -> dict:
    """Write the tiny world into `directory` (which must not exist yet); return its paths."""
    if os.path.exists(directory):
        raise DDOPatchError(f'{directory} exists; give a new directory for the example')
    paths = dict(data=os.path.join(directory, 'data'), mle=os.path.join(directory, 'mle'),
                 stats=os.path.join(directory, 'stats.pkl'))
    write_dataset(paths['data'])
    write_stats(paths['stats'])
    paths['pretrained'] = pretrain_tiny(paths['data'], paths['mle'], edm2_root)
    return paths


@click.command(context_settings=dict(help_option_names=['-h', '--help']))
@click.argument('directory', metavar='DIR')
@click.option('--edm2-root', metavar='DIR', default=None, help='NVlabs/edm2 checkout.  [default: $EDM2_ROOT, else the cache]')
def cmdline(directory, edm2_root):
    """Write a tiny EDM2 world into DIR (data, an MLE snapshot, statistics) for configs/tiny-cpu-edm2.toml."""
    paths = make_example(directory, edm2_root)
    click.echo(f'tiny EDM2 world in {directory}: pretrained {paths["pretrained"]}\n'
               f'next: DDO_TINY={directory} ddo-patch rounds run configs/tiny-cpu-edm2.toml --workdir WORKDIR')


if __name__ == '__main__':
    exit_on_user_error(cmdline)()
