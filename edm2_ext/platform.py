"""Process-group setup, and adapters for upstream EDM2 code that assumes CUDA and an older torch.

We adapt from outside instead of patching upstream files. Upstream (at the pin) hard-codes CUDA in four
places:

- `torch_utils.distributed.init` picks NCCL and calls `torch.cuda.set_device`: on CPU, `init_distributed`
  opens a gloo group itself and sets up `training_stats` with a CPU sync device (gloo reduces CPU
  tensors), so upstream's `init` is never called there;
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
import socket
import warnings

import torch

from ddo_patch.distributed import join_process_group
from ddo_patch.errors import DDOPatchError


def device_for_this_rank() -> torch.device:
    """The rank's GPU (LOCAL_RANK under torchrun) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
    return torch.device('cpu')


def init_distributed(device: torch.device) -> None:
    """Upstream `dist.init()` on CUDA; the same env:// defaults with gloo on CPU (idempotent)."""
    from torch_utils import distributed as dist
    from torch_utils import training_stats
    if device.type == 'cuda':
        dist.init()
        return
    if torch.distributed.is_initialized():
        return
    os.environ.setdefault('MASTER_ADDR', 'localhost')
    if 'MASTER_PORT' not in os.environ:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(('', 0))
            os.environ['MASTER_PORT'] = str(s.getsockname()[1])
    for name, default in (('RANK', '0'), ('LOCAL_RANK', '0'), ('WORLD_SIZE', '1')):
        os.environ.setdefault(name, default)
    join_process_group('gloo')
    world = torch.distributed.get_world_size()
    training_stats.init_multiprocessing(rank=torch.distributed.get_rank(), sync_device=torch.device('cpu') if world > 1 else None)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


class _CPUDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """DDP for CPU modules: `device_ids` must be None there (a subclass, so upstream's isinstance checks hold)."""

    def __init__(self, module, device_ids=None, output_device=None, **kwargs):
        super().__init__(module, **kwargs)


@contextlib.contextmanager
def _swapped(owner, name, value):
    """Set `owner.name = value` for the block; restore (or remove, if it was inherited) on exit."""
    had_own = name in vars(owner)
    original = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


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
            stack.enter_context(_swapped(torch.utils.data.Sampler, '__init__', _sampler_init))
        if device.type == 'cuda':
            yield
            return
        stack.enter_context(_swapped(torch.nn.parallel, 'DistributedDataParallel', _CPUDistributedDataParallel))
        stack.enter_context(_swapped(torch.cuda, 'max_memory_allocated', lambda *args, **kwargs: 0))
        stack.enter_context(_swapped(torch.cuda, 'max_memory_reserved', lambda *args, **kwargs: 0))
        stack.enter_context(_swapped(torch.cuda, 'reset_peak_memory_stats', lambda *args, **kwargs: None))
        yield
