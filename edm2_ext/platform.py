"""Adapters for upstream EDM2 code that assumes CUDA and an older torch, and its statistics' process-group setup.

We adapt from outside instead of patching upstream files. Upstream (at the pin) hard-codes CUDA in four
places:

- `torch_utils.distributed.init` picks NCCL and calls `torch.cuda.set_device`: `init_distributed` joins
  the group through `ddo_patch.distributed` (gloo on the CPU) and, on the CPU, sets up `training_stats`
  with a CPU sync device (gloo reduces CPU tensors), so upstream's `init` is never called there;
- `training_loop(device=...)` defaults to CUDA: we pass the device;
- the loop builds `DistributedDataParallel(net, device_ids=[device])`, which torch rejects for CPU
  modules, and calls `torch.cuda.reset_peak_memory_stats`, which a CPU-only torch lacks:
  `upstream_compatible(device)` swaps in a DDP subclass that drops `device_ids` and zero/no-op memory
  probes for the duration of the call only, and restores the originals on exit (also on error).

On CUDA none of these is swapped and upstream's own `init` runs unchanged. Independently of the device,
upstream's `misc.InfiniteSampler` calls `Sampler.__init__(dataset)`, an argument that recent torch
releases no longer accept (`Sampler` lost its `__init__`): within `upstream_compatible` the base class
gets a no-op `__init__(self, data_source=None)` back, removed again on exit. And upstream's
`CheckpointIO.load` calls `torch.load` with torch's default `weights_only=True` (since torch 2.6), which
refuses the `dnnlib.EasyDict` training state (allow-listing does not help: the weights-only unpickler
cannot fill a dict subclass). Within the block torch's own switch for call sites that do not pass
`weights_only`, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, is set, and restored on exit; the files it affects
are the run's own training-state-*.pt, so resuming works.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from ddo_patch.distributed import join_from_env
from ddo_patch.errors import DDOPatchError
from ddo_patch.scoped import swapped


def init_distributed(device: torch.device) -> None:
    """Join the process group (`ddo_patch.distributed`), then set up upstream's `training_stats` reductions: upstream's
    own `dist.init()` on CUDA (with the group already there it only does that), a CPU sync device on the CPU."""
    from torch_utils import distributed as dist
    from torch_utils import training_stats
    rank, world = join_from_env(device)
    if device.type == 'cuda':
        dist.init()
    else:
        training_stats.init_multiprocessing(rank=rank, sync_device=torch.device('cpu') if world > 1 else None)


class _CPUDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """DDP for CPU modules: `device_ids` must be None there (a subclass, so upstream's isinstance checks hold)."""

    def __init__(self, module, device_ids=None, output_device=None, **kwargs):
        super().__init__(module, **kwargs)


@contextlib.contextmanager
def _environment(name, value):
    original = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if original is None:
            del os.environ[name]
        else:
            os.environ[name] = original


def _sampler_init(self, data_source=None):
    pass


@contextlib.contextmanager
def upstream_compatible(device: torch.device):
    """Within the block, upstream's training loop runs on `device` (a GPU or the CPU) with this torch."""
    if device.type not in ('cuda', 'cpu'):
        raise DDOPatchError(f'device {device} is not supported; run on CUDA GPUs or on the CPU')
    with contextlib.ExitStack() as stack:
        stack.enter_context(_environment('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1'))
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings('ignore', 'Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD detected')
        if '__init__' not in vars(torch.utils.data.Sampler):
            stack.enter_context(swapped(torch.utils.data.Sampler, '__init__', _sampler_init))
        if device.type == 'cuda':
            yield
            return
        stack.enter_context(swapped(torch.nn.parallel, 'DistributedDataParallel', _CPUDistributedDataParallel))
        stack.enter_context(swapped(torch.cuda, 'max_memory_allocated', lambda *args, **kwargs: 0))
        stack.enter_context(swapped(torch.cuda, 'max_memory_reserved', lambda *args, **kwargs: 0))
        stack.enter_context(swapped(torch.cuda, 'reset_peak_memory_stats', lambda *args, **kwargs: None))
        yield
