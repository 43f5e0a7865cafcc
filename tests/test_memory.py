"""The memory count of `ddo_patch.memory` (exact on hand-made steps) and its check against a real CPU
measurement of peak RSS at two batch sizes for EDM2 and VAR steps (tests/memory_probe.py)."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from edm2_helpers import run, write_dataset
from var_tiny import TINY, tiny_checkpoints

from ddo_patch import memory, upstream

MiB = 2 ** 20
TESTS = os.path.dirname(os.path.abspath(__file__))


def test_each_storage_counts_once_from_its_op_until_freed():
    x = torch.empty(256, 1024, device='meta')      # 1 MiB made before the count: not counted

    def step():
        a = x * 2              # +1 MiB
        a.add_(1)              # in place: nothing new
        view = a.view(-1)[:10]  # a view: nothing new
        b = a + view.sum()     # +1 MiB (and a 4-byte sum) while a lives
        del a, view
        c = b * 3              # a is gone: still 2 MiB
        return c.t()

    assert memory.step_peak(step) == 2 * MiB + 4


def test_backward_gradients_and_saved_activations_are_counted():
    w = torch.empty(1024, 256, device='meta', requires_grad=True)   # 1 MiB weight, its gradient 1 MiB
    x = torch.empty(512, 1024, device='meta')                        # 2 MiB input

    def step():
        (x @ w).relu().sum().backward()

    # forward: x @ w and relu's output (0.5 MiB each); backward: relu's input gradient (0.5 MiB) and, once
    # relu's saved output is released, the weight's gradient (1 MiB): ops of the backward pass are counted
    assert memory.step_peak(step) == 1.5 * MiB + 8   # + the sum and its gradient, 4 bytes each
    assert w.grad is not None and w.grad.shape == w.shape


def test_fixed_state_and_description():
    state = memory.training_state(1000, ddp=True, ema=4000)
    assert state == {'weights': 4000, 'reference': 4000, 'adam': 8000, 'ddp_buckets': 4000, 'ema': 4000}
    assert 'ddp_buckets' not in memory.training_state(1000, ddp=False)
    estimate = memory.MemoryEstimate(8, {'weights': 3 * memory.GiB}, memory.GiB // 2)
    assert estimate.total == 3.5 * memory.GiB
    assert 'batch_gpu 8: 3.5 GiB' in estimate.describe()
    assert 'batch_gpu 8: 1.5 MiB = fixed state 1.0 MiB' in memory.MemoryEstimate(8, {'weights': MiB}, MiB // 2).describe()


@pytest.mark.upstream
def test_count_matches_peak_rss_of_real_cpu_steps(edm2_root, var_root):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', OMP_NUM_THREADS='1', EDM2_ROOT=str(edm2_root), VAR_ROOT=str(var_root))
    proc = subprocess.run([sys.executable, os.path.join(TESTS, 'memory_probe.py'), '8', '16'], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
    assert [(r['backend'], r['batch']) for r in rows] == [('edm2', 8), ('edm2', 16), ('var', 8), ('var', 16)]
    for row in rows:
        assert row['measured'] > 10 * MiB, row
        assert abs(row['counted'] - row['measured']) <= 0.05 * row['measured'], row
    for small, large in (rows[:2], rows[2:]):   # the step grows with the batch, in both counts
        assert large['measured'] > 1.7 * small['measured'] and large['counted'] > 1.7 * small['counted']


@pytest.mark.upstream
def test_edm2_dry_run_prints_the_expected_peak_and_writes_nothing(edm2_root, tmp_path):
    upstream.activate('edm2', str(edm2_root))
    from training.networks_edm2 import Precond
    data = write_dataset(tmp_path / 'data')
    with open(tmp_path / 'ref.pkl', 'wb') as f:
        pickle.dump({'ema': Precond(8, 3, 4, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])}, f)
    proc = run(['-m', 'edm2_ext.train', '--outdir', str(tmp_path / 'run'), '--data', data, '--ref', str(tmp_path / 'ref.pkl'),
                '--fake', data, '--batch', '16', '--batch-gpu', '4', '--dry-run'], edm2_root, tmp_path)
    assert 'expected per-GPU peak at batch_gpu 4: ' in proc.stdout and 'MiB = fixed state' in proc.stdout
    assert not (tmp_path / 'run').exists()


@pytest.mark.upstream
def test_var_dry_run_prints_the_expected_peak_of_its_micro_batch(var_root, tmp_path, capsys):
    from var_ext import memory as var_memory
    from var_ext import train
    vae, ckpt = tiny_checkpoints(str(tmp_path))
    assert train.main(['--ref', ckpt, '--vae', vae, '--depth', '2', '--patch-nums', '1_2_3_4', '--num-classes', '10',
                       '--vae-vocab', '64', '--vae-ch', '32', '--vae-z', '8', '--dataset', 'var_tiny:token_dataset',
                       '--workers', '0', '--global-batch', '8', '--batch-gpu', '4', '--outdir', str(tmp_path / 'run'),
                       '--dry-run']) == 0
    expected = var_memory.step_memory(TINY, 4, ddp=False)   # token pyramids: nothing to tokenise
    assert expected.describe() in capsys.readouterr().out
    assert not (tmp_path / 'run').exists()
