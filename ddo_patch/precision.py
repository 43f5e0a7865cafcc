"""Numerical precision of a training step: fp32 (the paper's), TF32, bf16 and fp16 autocast, on a GPU and on a CPU.

The paper trains EDM2 DDO in full fp32 and upstream EDM2 turns TF32 off; a GPU's reduced-precision modes are
several times faster. `Precision(mode, device_type)` gives the two contexts a training entry point needs:

- `forward()`, around the loss's forward passes (both networks): `torch.autocast` to bf16 or fp16 (autocast
  runs convolutions and matrix products in the low dtype and keeps its fp32 ops in fp32; the backward pass then
  follows the forward's dtypes, as autocast intends); for TF32 on CUDA it turns TF32 on for matrix products and
  cuDNN convolutions (upstream's loop turns them off when it starts, so this is done at every step; they stay on
  for the backward pass);
- `loop()`, around the whole training loop: on a CPU, TF32 is emulated by `RoundedMatmuls`, forward and
  backward alike; nothing otherwise.

On a CPU the modes are there to measure what a GPU would do, not for speed:
- TF32 is emulated exactly as the tensor cores compute it: both multiplicands of every convolution and matrix
  product rounded to a 10-bit mantissa (round to nearest even), products accumulated in fp32 (the summation
  order differs from a GPU's, an fp32-rounding-level difference);
- bf16 and fp16 are real CPU autocast: the same low dtype for convolutions and matrix products, but CPU
  autocast's fp32 list is shorter than CUDA's (CUDA also runs exp, log, pow, sum, softmax, norm ... in fp32; the
  CPU runs them in the dtype they are given), so on a CPU more of the step is low precision than on a GPU: a
  pessimistic stand-in. `benchmarks/digits_precision.py` counts which of the step's ops that concerns.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddo_patch.errors import DDOPatchError

MODES = ('fp32', 'tf32', 'bf16', 'fp16')
AUTOCAST = {'bf16': torch.bfloat16, 'fp16': torch.float16}

_ops = torch.ops.aten
# op -> positions of its two multiplicands (addmm/baddbmm add their first argument, the bias)
_MULTIPLICANDS = {_ops.convolution.default: (0, 1), _ops.convolution_backward.default: (0, 1, 2), _ops.mm.default: (0, 1),
                  _ops.bmm.default: (0, 1), _ops.addmm.default: (1, 2), _ops.baddbmm.default: (1, 2)}


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to TF32 (10 mantissa bits, round to nearest even); other dtypes unchanged."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    bits = bits + (0xFFF + ((bits >> 13) & 1))          # round to nearest, ties to even, at bit 13
    return (bits & ~0x1FFF).view(torch.float32).view_as(x)


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to bf16 (7 mantissa bits, round to nearest even), kept in fp32; other dtypes unchanged."""
    return x.to(torch.bfloat16).to(torch.float32) if x.dtype == torch.float32 else x


class RoundedMatmuls(TorchDispatchMode):
    """Within the block, convolutions and matrix products (their backward too) get their multiplicands (or, with
    `every_input`, all their tensor arguments) rounded by `rounding`, and with `output` their result too; fp32
    otherwise. The convolution's backward takes (grad_output, input, weight): all three are multiplicands."""

    def __init__(self, rounding, every_input=False, output=False):
        super().__init__()
        self.rounding, self.every_input, self.output = rounding, every_input, output

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        positions = _MULTIPLICANDS.get(func)
        if positions is None:
            return func(*args, **(kwargs or {}))
        args = tuple(self.rounding(a) if isinstance(a, torch.Tensor) and (self.every_input or i in positions) else a
                     for i, a in enumerate(args))
        out = func(*args, **(kwargs or {}))
        if not self.output:
            return out
        return tuple(self.rounding(o) if isinstance(o, torch.Tensor) else o for o in out) if isinstance(out, tuple) else self.rounding(out)


@contextlib.contextmanager
def _cuda_tf32():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    yield


class Precision:
    """The contexts of one precision mode on one device type (see the module docstring)."""

    def __init__(self, mode: str, device_type: str):
        if mode not in MODES:
            raise DDOPatchError(f'unknown precision {mode!r}; choose from {", ".join(MODES)}')
        self.mode, self.device_type = mode, device_type

    def forward(self):
        if self.mode in AUTOCAST:
            return torch.autocast(self.device_type, dtype=AUTOCAST[self.mode])
        if self.mode == 'tf32' and self.device_type == 'cuda':
            return _cuda_tf32()
        return contextlib.nullcontext()

    def loop(self):
        if self.mode == 'tf32' and self.device_type != 'cuda':
            return RoundedMatmuls(round_to_tf32)
        return contextlib.nullcontext()
