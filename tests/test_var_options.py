"""var_ext's option handling that needs no VAR checkout: the torchvision check of --data, the data-loader
default, the samples/s figure of the log."""

import os
import warnings

import pytest
import torch

from ddo_patch.errors import DDOPatchError
from var_ext import datasets, train


def broken_torchvision(tmp_path, monkeypatch, body):
    """A `torchvision` package first on sys.path whose import runs `body`, as a torchvision built for another torch."""
    package = tmp_path / 'fake' / 'torchvision'
    package.mkdir(parents=True)
    (package / '__init__.py').write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path / 'fake'))
    monkeypatch.delitem(__import__('sys').modules, 'torchvision', raising=False)


@pytest.mark.parametrize('body, problem', [
    ('raise RuntimeError("operator torchvision::nms does not exist\\nmore C++ lines")',
     'importing torchvision fails (RuntimeError: operator torchvision::nms does not exist)'),
    ('import torchvision_missing_extension', "importing torchvision fails (ModuleNotFoundError: No module named 'torchvision_missing_extension')"),
    ('raise ModuleNotFoundError("No module named torchvision", name="torchvision")', 'torchvision is not installed'),
])
def test_data_with_a_broken_torchvision_fails_in_one_line(tmp_path, monkeypatch, body, problem):
    broken_torchvision(tmp_path, monkeypatch, body)
    with pytest.raises(DDOPatchError) as err:
        datasets.build_dataset(str(tmp_path / 'imagenet'), None, 256)
    message = str(err.value)
    assert '\n' not in message and problem in message, message
    assert message.endswith(f'install the torchvision built for your torch {torch.__version__}, or pass --dataset module:function')


@pytest.mark.parametrize('cpus, local_ranks, workers', [(1, 1, 0), (2, 1, 1), (8, 1, 4), (64, 8, 4), (16, 8, 1), (8, 8, 0)])
def test_default_workers_leave_a_cpu_per_process(monkeypatch, cpus, local_ranks, workers):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', str(local_ranks))
    assert datasets.default_workers() == workers


def test_default_workers_do_not_warn_on_two_cores(monkeypatch):
    """torch's DataLoader warns when it starts more workers than the CPUs it may use (the old default 4 did on 2 cores)."""
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(4)), num_workers=datasets.default_workers())
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        loader.check_worker_number_rationality()
    with pytest.warns(UserWarning, match='4 worker processes'):
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(4)), num_workers=4).check_worker_number_rationality()


@pytest.mark.parametrize('value, text', [(0.012345, '0.0123'), (0.04, '0.0400'), (1.0, '1.00'), (12.345, '12.3'),
                                         (999.4, '999'), (123456.7, '123457'), (0.0, '0'), (float('inf'), 'inf')])
def test_samples_per_second_have_three_significant_digits(value, text):
    assert train.significant(value) == text
