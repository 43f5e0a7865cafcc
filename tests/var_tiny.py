"""Tiny VQVAE + VAR pairs for the VAR integration tests: random weights, patch_nums (1, 2, 3, 4), CPU."""

import functools

import torch

from var_ext import models

TINY = models.VARConfig(depth=2, patch_nums=(1, 2, 3, 4), num_classes=10, vae_vocab=64, vae_z_channels=8, vae_ch=32)


def build_tiny(root, seed=0, cfg=TINY):
    """A fresh, deterministically initialised (vqvae, var); upstream leaves the VQVAE uninitialised."""
    torch.manual_seed(seed)
    vae, var = models.build(cfg, 'cpu', var_root=root)
    for module in vae.modules():
        if module is not vae and hasattr(module, 'reset_parameters'):
            module.reset_parameters()
    # Sharpen the head a little so that samples and likelihoods depend visibly on the weights.
    var.head.weight.data.normal_(0, 0.5)
    return vae, var


@functools.lru_cache(maxsize=None)
def tiny_checkpoints(root, directory):
    """Write the VQVAE and VAR state dicts of `build_tiny` once per session; return their paths."""
    vae, var = build_tiny(root)
    vae_path, var_path = f'{directory}/vae_tiny.pth', f'{directory}/var_tiny.pth'
    torch.save(vae.state_dict(), vae_path)
    torch.save(var.state_dict(), var_path)
    return vae_path, var_path
