"""Tiny VQVAE + VAR pairs for the VAR integration tests: random weights, patch_nums (1, 2, 3, 4), CPU."""

import functools

import pytest
import torch

from var_ext import models

TINY = models.VARConfig(depth=2, patch_nums=(1, 2, 3, 4), num_classes=10, vae_vocab=64, vae_z_channels=8, vae_ch=32)


@pytest.fixture(scope='module')
def one_cpu_thread():
    """Tiny models on a shared 2-core machine run ~5x faster single-threaded (no oversubscription)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def build_tiny(seed=0, cfg=TINY):
    """A fresh, deterministically initialised (vqvae, var); upstream leaves the VQVAE uninitialised."""
    torch.manual_seed(seed)
    vae, var = models.build(cfg, 'cpu')
    for module in vae.modules():
        if module is not vae and hasattr(module, 'reset_parameters'):
            module.reset_parameters()
    # Sharpen the head a little so that samples and likelihoods depend visibly on the weights.
    var.head.weight.data.normal_(0, 0.5)
    return vae, var


@functools.lru_cache(maxsize=None)
def tiny_checkpoints(directory):
    """Write the VQVAE and VAR state dicts of `build_tiny` once per session; return their paths."""
    vae, var = build_tiny()
    vae_path, var_path = f'{directory}/vae_tiny.pth', f'{directory}/var_tiny.pth'
    torch.save(vae.state_dict(), vae_path)
    torch.save(var.state_dict(), var_path)
    return vae_path, var_path


def prototype_tokens(num_classes=TINY.num_classes, length=30, vocab=TINY.vae_vocab):
    return torch.randint(vocab, (num_classes, length), generator=torch.Generator().manual_seed(1234))


def draw_real_tokens(labels, generator, keep=0.8, vocab=TINY.vae_vocab):
    """The synthetic 'data': each class's prototype sequence with 20 % of its tokens resampled uniformly."""
    proto = prototype_tokens()[labels]
    noise = torch.randint(vocab, proto.shape, generator=generator)
    return torch.where(torch.rand(proto.shape, generator=generator) < keep, proto, noise)


def token_dataset(resolution):
    """`--dataset tests/var_tiny:token_dataset`: 128 tokenised samples of the synthetic distribution."""
    labels = torch.arange(128) % TINY.num_classes
    tokens = draw_real_tokens(labels, torch.Generator().manual_seed(5))
    return torch.utils.data.TensorDataset(tokens, labels)


def bad_label_dataset(resolution):
    tokens, labels = token_dataset(resolution).tensors
    return torch.utils.data.TensorDataset(tokens, labels + TINY.num_classes)


def brightness(images, labels):
    """A stand-in metric (lower is better): mean pixel value. Images arrive uint8 NHWC, class-balanced."""
    assert images.dtype.name == 'uint8' and images.shape[1:] == (64, 64, 3) and len(images) == len(labels)
    return float(images.mean())


def image_dataset(resolution):
    """`--dataset var_tiny:image_dataset`: 16 random images in [-1, 1], tokenised by the VQVAE during training."""
    images = torch.rand(16, 3, resolution, resolution, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return torch.utils.data.TensorDataset(images, torch.arange(16) % TINY.num_classes)
