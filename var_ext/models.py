"""Building the official VQVAE + VAR pair from the upstream checkout, without leaking its side effects.

Upstream `models.build_vae_var` switches off torch's default initialisation by assigning a no-op
`reset_parameters` to eight torch layer classes, for the whole process and for good. `build()` runs it
inside `upstream_initialisation_disabled()`, which puts the original methods back on exit, so a VAR built
here leaves `nn.Linear(...)` etc. behaving normally for everyone else in the process.

DDO turns off every stochastic layer of VAR (appendix C: "we disable all dropout layers"): dropout and
drop-path rates go to 0, and VAR's own label dropout (`cond_drop_rate`) goes to 0 because the trainer
draws one mask per step and passes dropped labels explicitly as class `num_classes` (VAR's "no class"
embedding row).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import os
from typing import Tuple

import torch.nn as nn

from ddo_patch import upstream
from ddo_patch.scoped import restored

# The classes whose `reset_parameters` upstream replaces (models/__init__.py at the pin).
_PATCHED_CLASSES = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d,
                    nn.ConvTranspose1d, nn.ConvTranspose2d)

PAPER_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)   # VAR's ImageNet-256 token pyramid


@dataclasses.dataclass(frozen=True)
class VARConfig:
    """Everything that fixes the shapes of a VQVAE + VAR pair (upstream hard-codes the VQVAE ones in train.py)."""
    depth: int = 16
    patch_nums: Tuple[int, ...] = PAPER_PATCH_NUMS
    num_classes: int = 1000
    vae_vocab: int = 4096          # V
    vae_z_channels: int = 32       # Cvae
    vae_ch: int = 160              # VQVAE base width
    share_quant_resi: int = 4
    shared_aln: bool = False       # VAR-d16..d30 release: False
    attn_l2_norm: bool = True      # VAR-d16..d30 release: True

    @property
    def resolution(self) -> int:
        return self.patch_nums[-1] * 16   # the VQVAE downsamples by 16 (ch_mult of length 5)


def activate_upstream(var_root=None):
    """Make the VAR checkout's top-level modules (`models`, `trainer`, `utils`, `dist`) importable; returns its path.

    Called once by each entry point (locator order: --var-root, $VAR_ROOT, the ddo-patch cache); var_ext's
    modules then import upstream plainly, inside the functions that use it. Upstream's `utils/arg_util.py`
    (imported by `trainer` and `utils.misc`) runs `git rev-parse HEAD` in the working directory when imported
    and fails outside a git repository, so it is imported here with the checkout as working directory.
    """
    root = upstream.activate('var', var_root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        importlib.import_module('utils.arg_util')
    finally:
        os.chdir(cwd)
    return root


def upstream_initialisation_disabled():
    """Let upstream disable torch's default init while inside, and restore the original methods on exit."""
    stack = contextlib.ExitStack()
    for cls in _PATCHED_CLASSES:
        stack.enter_context(restored(cls, 'reset_parameters'))
    return stack


def disable_stochastic_layers(var: nn.Module) -> None:
    """Dropout, drop-path and VAR's internal label dropout off (appendix C); shapes and keys unchanged."""
    var.cond_drop_rate = 0.0
    var.drop_path_rate = 0.0
    for module in var.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, 'drop_prob'):        # upstream DropPath
            module.drop_prob = 0.0
        if hasattr(module, 'attn_drop') and isinstance(module.attn_drop, float):
            module.attn_drop = 0.0


def build(cfg: VARConfig, device, fused_if_available: bool = True):
    """Upstream `build_vae_var` with the process-wide side effect undone; returns (vqvae, var) on `device`.

    Weights are left as upstream leaves them (VAR: its own `init_weights`; VQVAE: uninitialised), because
    both are meant to be overwritten by `checkpoints.load_*`.
    """
    import models as upstream_models
    with upstream_initialisation_disabled():
        vae, var = upstream_models.build_vae_var(
            device=device, patch_nums=tuple(cfg.patch_nums),
            V=cfg.vae_vocab, Cvae=cfg.vae_z_channels, ch=cfg.vae_ch, share_quant_resi=cfg.share_quant_resi,
            num_classes=cfg.num_classes, depth=cfg.depth, shared_aln=cfg.shared_aln, attn_l2_norm=cfg.attn_l2_norm,
            flash_if_available=fused_if_available, fused_if_available=fused_if_available,
        )
    disable_stochastic_layers(var)
    return vae, var


def frozen_copy(var: nn.Module, device=None) -> nn.Module:
    """A second VAR with the same weights, in eval mode and without gradients: DDO's reference."""
    shared = {id(m): m for m in (*var.vae_proxy, *var.vae_quant_proxy)}   # one frozen VQVAE for both
    ref = copy.deepcopy(var, memo=shared)
    if device is not None:
        ref.to(device)
    ref.eval().requires_grad_(False)
    return ref


def parse_patch_nums(text: str) -> Tuple[int, ...]:
    """'1_2_3_4' or '1,2,3,4' -> (1, 2, 3, 4), as upstream's `--pn`."""
    return tuple(int(p) for p in text.replace(',', '_').replace('-', '_').split('_') if p)
