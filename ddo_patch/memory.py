"""Per-GPU memory of a training step, counted on PyTorch's meta device: no memory, no compute, any size.

    expected peak = fixed state + step peak

- fixed state, alive for the whole run, in bytes per parameter P of the trained network (all fp32):
  weights 4P, the frozen reference 4P, Adam's two moments 8P, DDP's gradient buckets 4P (with more than
  one process; DDP keeps them beside the gradients), plus what an adapter adds (EDM2's EMA copy 4P, VAR's
  VQVAE);
- step peak: the most bytes held at once by the tensors one step creates (activations saved for backward,
  gradients, temporaries of the backward and of the optimiser), counted by `LiveTensorBytes` while the
  step runs on meta tensors of the real architecture and batch.

Not counted: what the CUDA caching allocator reserves beyond live tensors (fragmentation), cuBLAS/cuDNN
workspaces and the CUDA context (about 0.5-1 GiB); leave some 10 % of the GPU free for them.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GiB = 2 ** 30


def _storages(values):
    return [t.untyped_storage() for t in tree_flatten(values)[0] if isinstance(t, torch.Tensor)]


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the block and still alive, on any device (meta too).

    Every op's outputs are seen below autograd (also in the backward pass); a storage counts from the op
    that allocated it (an output storage that is none of the op's inputs') until it is freed. `bound` is
    the bytes of the storages recorded and not yet seen freed, an upper bound of the live bytes: freed
    storages are looked for only when it exceeds the peak so far, which keeps the count exact and cheap.
    """

    def __enter__(self):
        self.live, self.bound, self.peak = {}, 0, 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {s._cdata for s in _storages((args, kwargs))}
        for storage in _storages(out):
            if storage._cdata not in inputs and storage._cdata not in self.live:
                self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                self.bound += storage.nbytes()
        if self.bound > self.peak:
            for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                self.bound -= self.live.pop(key)[1]
            self.peak = max(self.peak, self.bound)
        return out


def step_peak(step) -> int:
    """Run `step()` and return the peak bytes of the tensors it created (see `LiveTensorBytes`)."""
    with LiveTensorBytes() as tracker:
        step()
    return tracker.peak


def create_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """One update with zero gradients, so that the optimiser's state (Adam's moments: fixed state, not the
    step's) exists before a step is counted, as it does from the first training step on."""
    params = [p for group in optimizer.param_groups for p in group['params']]
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for param in params:
        param.grad = None


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def training_state(params: int, ddp: bool, reference: bool = True, **extra: int) -> dict:
    """The fixed state of a run in bytes (fp32): weights, the reference (DDO; not the MLE control), Adam, DDP buckets
    and `extra` ones."""
    state = {'weights': 4 * params, **({'reference': 4 * params} if reference else {}), 'adam': 8 * params}
    if ddp:
        state['ddp_buckets'] = 4 * params
    state.update(extra)
    return state


@dataclasses.dataclass
class MemoryEstimate:
    """Expected per-GPU peak of a training step: the fixed state (by name) plus the counted step peak."""
    batch_gpu: int      # real samples per GPU and pass (as many reference samples go with them)
    fixed: dict         # name -> bytes
    step: int           # bytes

    @property
    def total(self) -> int:
        return sum(self.fixed.values()) + self.step

    def describe(self) -> str:
        unit, scale = ('GiB', GiB) if self.total >= GiB else ('MiB', 2 ** 20)
        fixed = ', '.join(f'{name} {value / scale:.1f}' for name, value in self.fixed.items())
        return (f'expected per-GPU peak at batch_gpu {self.batch_gpu}: {self.total / scale:.1f} {unit} = fixed state '
                f'{sum(self.fixed.values()) / scale:.1f} {unit} ({fixed}) + step {self.step / scale:.1f} {unit} (activations, '
                f'gradients, temporaries; counted on the meta device). Allocator reserve and workspaces come on top.')
