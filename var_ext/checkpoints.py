"""Reading and writing VAR/VQVAE weights with one-line errors, and atomic writes.

Checkpoints written here are plain VAR state dicts (what upstream releases as `var_d16.pth` and what
`var.load_state_dict(..., strict=True)` accepts); the optimiser and loop state go to a separate file.
"""

from __future__ import annotations

import os
from typing import Dict

import torch

from ddo_patch.errors import DDOPatchError
from ddo_patch.files import write_atomic

OFFICIAL_VAE = 'vae_ch160v4096z32.pth'
_SHOWN_KEYS = 3   # how many mismatched keys an error names


def require_file(path, what: str) -> None:
    if not os.path.isfile(path):
        hint = (f' (the official file is {OFFICIAL_VAE} from the VAR release; ddo-patch never downloads it)'
                if what == 'VQVAE' else '')
        raise DDOPatchError(f'{what} file {path} not found{hint}; pass an existing file')


def read_state_dict(path, what: str) -> Dict[str, torch.Tensor]:
    """A state dict from `path`; also accepts upstream's training checkpoints (`ar-ckpt-*.pth`)."""
    require_file(path, what)
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which and why, in one line
        raise DDOPatchError(f'cannot read {what} file {path}: {type(err).__name__}: {str(err).splitlines()[0]}') from None
    if isinstance(state, dict) and isinstance(state.get('trainer'), dict) and 'var_wo_ddp' in state['trainer']:
        state = state['trainer']['var_wo_ddp']    # upstream train.py's ar-ckpt layout
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DDOPatchError(f'{what} file {path} is not a state dict of tensors')
    return state


def check_compatible(model: torch.nn.Module, state: Dict[str, torch.Tensor], path, flags: str, any_shape=()) -> None:
    """Raise naming the first mismatched keys when `state` cannot load strictly into `model`.

    `any_shape`: keys whose shape may differ because the model's own load_state_dict adapts them.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
                if k in state and k not in any_shape and state[k].shape != v.shape]
    problems = [f'{name}: {", ".join(keys[:_SHOWN_KEYS])}{" ..." if len(keys) > _SHOWN_KEYS else ""}'
                for name, keys in (('shape (file vs flags)', reshaped), ('missing', missing), ('unexpected', unexpected)) if keys]
    if problems:
        raise DDOPatchError(f'{path} does not match {flags}: {"; ".join(problems)}; fix the flags to match the checkpoint')


def load_var(var, path, flags: str) -> None:
    state = read_state_dict(path, 'VAR checkpoint')
    check_compatible(var, state, path, flags)
    var.load_state_dict(state, strict=True)


def load_vae(vae, path, flags: str) -> None:
    state = read_state_dict(path, 'VQVAE')
    # upstream VQVAE.load_state_dict resizes its per-scale usage statistics to the model's patch_nums
    check_compatible(vae, state, path, flags, any_shape=('quantize.ema_vocab_hit_SV',))
    vae.load_state_dict(state, strict=True)


def save_atomic(obj, path) -> None:
    """torch.save through `write_atomic`: a crash never leaves half a checkpoint."""
    write_atomic(path, lambda f: torch.save(obj, f))
