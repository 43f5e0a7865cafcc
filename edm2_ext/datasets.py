"""EDM2 data sets as DDO sees them: the real data and the reference ("fake") samples, checked against the net.

Import after `ddo_patch.upstream.activate('edm2')`.

Formats (upstream `training.dataset.ImageFolderDataset`, zip or folder, labels in `dataset.json`):
- real data: uint8 RGB images (pixel models) or 8-channel `img-mean-std-*.npy` VAE moments (latent
  models), exactly what upstream trains on;
- fake data, as `edm2_ext.generate` writes it: uint8 RGB images (pixel models) or float32 `.npy`
  final-space latents straight from the sampler (latent models; no decode/encode round trip).
"""

from __future__ import annotations

import numpy as np
import torch

from ddo_patch.errors import DDOPatchError
from training.dataset import ImageFolderDataset
from training.encoders import StandardRGBEncoder

ENCODERS = {3: 'training.encoders.StandardRGBEncoder', 8: 'training.encoders.StabilityVAEEncoder'}  # by raw channels


def open_dataset(path: str, option: str, use_labels: bool = True) -> ImageFolderDataset:
    try:
        return ImageFolderDataset(path=path, use_labels=use_labels)
    except (IOError, OSError) as err:
        raise DDOPatchError(f'{option} {path}: {err}; give an EDM2 data set (zip or folder, labels in dataset.json)') from None


def data_interface(dataset: ImageFolderDataset) -> tuple:
    """(resolution, final channels, label_dim) that upstream's loop derives from the real data set."""
    if dataset.num_channels not in ENCODERS:
        raise DDOPatchError(f'--data has {dataset.num_channels} channels; EDM2 trains on 3 (RGB) or 8 (VAE moments)')
    channels = 3 if dataset.num_channels == 3 else 4
    return dataset.resolution, channels, dataset.label_dim


def fake_to_final(images: torch.Tensor) -> torch.Tensor:
    """Reference samples into the space the network denoises: uint8 pixels are scaled like the real data
    (upstream's StandardRGBEncoder); float latents are already final."""
    return StandardRGBEncoder().encode_latents(images) if images.dtype == torch.uint8 else images.to(torch.float32)


def check_fake_set(fake: ImageFolderDataset, net_interface: tuple, latent: bool) -> None:
    """One-line errors for a fake set that the network cannot be trained against."""
    resolution, channels, label_dim = net_interface
    sample = fake[0][0]
    if latent and sample.dtype == np.uint8:
        raise DDOPatchError('--fake holds uint8 images but the network is a latent model; generate final-space latents '
                            'with `python -m edm2_ext.generate` (it stores .npy latents for latent models)')
    if not latent and sample.dtype != np.uint8:
        raise DDOPatchError(f'--fake holds {sample.dtype} arrays but the network is a pixel model; it needs uint8 images')
    if fake.resolution != resolution or fake.num_channels != channels:
        raise DDOPatchError(f'--fake samples are {fake.num_channels}x{fake.resolution}x{fake.resolution}, but the network '
                            f'denoises {channels}x{resolution}x{resolution}; generate them with this network')
    if label_dim > 0 and not fake.has_labels:
        raise DDOPatchError('--fake has no labels (dataset.json) but the network is class-conditional; '
                            'generate it with `python -m edm2_ext.generate`, which writes class-balanced labels')
    if label_dim > 0 and fake.label_dim != label_dim:
        raise DDOPatchError(f'--fake labels have {fake.label_dim} classes but the network has label_dim {label_dim}; '
                            f'generate at least one sample per class with this network')
