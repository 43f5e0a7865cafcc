"""Unit tests (no upstream needed): the adapters of edm2_ext.platform last exactly as long as their block."""

import os

import pytest
import torch

from ddo_patch.errors import DDOPatchError
from edm2_ext.platform import upstream_compatible

ENV = 'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'


def _snapshot():
    return (torch.nn.parallel.DistributedDataParallel, torch.cuda.max_memory_allocated, torch.cuda.reset_peak_memory_stats,
            dict(vars(torch.utils.data.Sampler)), os.environ.get(ENV))


def test_cpu_adapters_apply_inside_and_are_undone_after_an_error():
    before = _snapshot()
    with pytest.raises(RuntimeError, match='boom'):
        with upstream_compatible(torch.device('cpu')):
            assert torch.nn.parallel.DistributedDataParallel is not before[0]
            assert issubclass(torch.nn.parallel.DistributedDataParallel, before[0])  # upstream's isinstance checks hold
            assert torch.cuda.max_memory_allocated(torch.device('cpu')) == 0
            torch.cuda.reset_peak_memory_stats()  # a no-op instead of an error on CPU-only torch
            torch.utils.data.Sampler(range(3))  # upstream's InfiniteSampler passes the dataset up
            assert os.environ[ENV] == '1'
            raise RuntimeError('boom')
    assert _snapshot() == before


def test_cuda_device_keeps_torch_cuda_and_ddp_untouched():
    before = _snapshot()
    with upstream_compatible(torch.device('cuda')):
        assert torch.nn.parallel.DistributedDataParallel is before[0]
        assert torch.cuda.reset_peak_memory_stats is before[2]
    assert _snapshot() == before


def test_other_devices_are_a_user_error():
    with pytest.raises(DDOPatchError):
        with upstream_compatible(torch.device('meta')):
            pass
