"""A tiny EDM2 world for trying the round manager on a CPU in minutes (`ddo-patch rounds example DIR`):

    DIR/data/             64 labelled 8x8 RGB images in EDM2's data set layout (4 classes, colour by class)
    DIR/mle/network-snapshot-0000001-0.100.pkl   a tiny EDM2 UNet trained on them by upstream's own loop
    DIR/stats.pkl         reference statistics of the data for `PixelProjection` (an offline stand-in for Inception)

The tiny MLE run is upstream's `training.training_loop` in a subprocess (this package never imports
upstream code itself), with `edm2_ext.platform` adapting it to the CPU as `edm2_ext.train` does.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import torch

from ddo_patch.errors import DDOPatchError

CLASSES, RESOLUTION, IMAGES = 4, 8, 64

# A short MLE run of upstream's loop: python -c MLE_SCRIPT DATA RUN_DIR ENCODER_CLASS (also used by the EDM2 tests).
MLE_SCRIPT = textwrap.dedent('''
    import sys, torch
    from ddo_patch import upstream
    upstream.activate('edm2')
    import training.training_loop
    from edm2_ext.platform import init_distributed, upstream_compatible
    device = torch.device('cpu')
    init_distributed(device)
    with upstream_compatible(device):
        training.training_loop.training_loop(run_dir=sys.argv[2], device=device, batch_size=16, total_nimg=1024,
            status_nimg=None, snapshot_nimg=1024, checkpoint_nimg=None,
            dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=sys.argv[1], use_labels=True),
            encoder_kwargs=dict(class_name=sys.argv[3]),
            data_loader_kwargs=dict(class_name='torch.utils.data.DataLoader', num_workers=0),
            network_kwargs=dict(class_name='training.networks_edm2.Precond', model_channels=16, channel_mult=[1, 2],
                                num_blocks=1, attn_resolutions=[4]),
            lr_kwargs=dict(func_name='training.training_loop.learning_rate_schedule', ref_lr=1e-2, ref_batches=0, rampup_Mimg=0),
            ema_kwargs=dict(class_name='training.phema.PowerFunctionEMA', stds=[0.1]))
    from ddo_patch.distributed import end_process
    end_process()
''')


class PixelProjection:
    """A feature detector for `edm2_ext.evaluate --detector fid=ddo_patch.rounds_example:PixelProjection`:
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


def write_dataset(path):
    import PIL.Image
    images, labels = tiny_images()
    os.makedirs(path)
    for i, image in enumerate(images):
        PIL.Image.fromarray(image, 'RGB').save(os.path.join(path, f'{i:05d}.png'))
    with open(os.path.join(path, 'dataset.json'), 'w') as f:
        json.dump({'labels': [[f'{i:05d}.png', int(c)] for i, c in enumerate(labels)]}, f)


def write_stats(path):
    """Upstream's reference-statistics format, {metric: {mu, sigma}}, of the data under PixelProjection."""
    images, _ = tiny_images()
    features = PixelProjection()(torch.as_tensor(images).permute(0, 3, 1, 2)).numpy()
    with open(path, 'wb') as f:
        pickle.dump({'fid': dict(mu=features.mean(0), sigma=np.cov(features, rowvar=False))}, f)


def make_example(directory, edm2_root=None) -> dict:
    """Write the tiny world into `directory` (which must not exist yet); return its paths."""
    if os.path.exists(directory):
        raise DDOPatchError(f'{directory} exists; give a new directory for the example')
    paths = dict(data=os.path.join(directory, 'data'), mle=os.path.join(directory, 'mle'),
                 stats=os.path.join(directory, 'stats.pkl'))
    write_dataset(paths['data'])
    write_stats(paths['stats'])
    os.makedirs(paths['mle'])
    env = dict(os.environ, OMP_NUM_THREADS='1', **({'EDM2_ROOT': str(edm2_root)} if edm2_root else {}))
    proc = subprocess.run([sys.executable, '-c', MLE_SCRIPT, paths['data'], paths['mle'], 'training.encoders.StandardRGBEncoder'], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise DDOPatchError(f'the tiny MLE run failed: {(proc.stderr.strip().splitlines() or ["no output"])[-1]}')
    paths['pretrained'] = os.path.join(paths['mle'], 'network-snapshot-0000001-0.100.pkl')
    return paths
