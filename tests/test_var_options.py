"""var_ext's option handling that needs no VAR checkout: the torchvision check of --data, the data-loader
default, the samples/s figure of the log, the guidance scales evaluated and the one that selects."""

import json
import os
import warnings

import pytest
import torch
from rounds_helpers import write_config

from ddo_patch.errors import DDOPatchError
from ddo_patch.rounds import config as rounds_config
from var_ext import datasets, run_files, train


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


def test_guidance_scales_parse_from_command_lines_and_configs():
    assert run_files.parse_scales('0,1.5') == run_files.parse_scales([0, 1.5]) == (0.0, 1.5)
    assert run_files.parse_scales(0) == run_files.parse_scales('0') == (0.0,)
    assert run_files.format_scales((0.0, 1.5, 3.0)) == '0,1.5,3'
    for bad in ('', '0,-1', '0,0', 'a', 'nan', [], [0, 'x']):
        with pytest.raises(DDOPatchError, match='give distinct numbers >= 0, e.g. 0,1.5'):
            run_files.parse_scales(bad)
    assert run_files.check_selected((0.0, 1.5), 1.5, '--eval-cfg/--select-cfg') == 'cfg=1.5'
    with pytest.raises(DDOPatchError, match=r'the selecting scale 2 is not one of the evaluated scales 0,1.5 \(--eval-cfg/--select-cfg\)'):
        run_files.check_selected((0.0, 1.5), 2, '--eval-cfg/--select-cfg')


def var_config(tmp_path, **evaluate):
    (tmp_path / 'var.pth').write_bytes(b'')
    top = {'backend': 'var_ext.rounds_backend.RoundsBackend', 'rounds': 1, 'pretrained': str(tmp_path / 'var.pth')}
    tables = {'run': {'duration': 4, 'eval_every': 2}, 'sweep': {'alpha': [10], 'beta': [0.02]},
              'train': {'dataset': 'var_tiny:token_dataset'}, 'evaluate': {'metric': 'm:f', 'samples': 10, **evaluate}}
    return write_config(tmp_path / 'var.toml', top, tables)


def test_rounds_backend_evaluates_every_scale_and_records_them_selecting_by_one(tmp_path):
    backend = rounds_config.load(var_config(tmp_path, cfg=[0, 1.5], select_cfg=1.5)).make_backend()
    train_cmd, = backend.run_commands(1, 'round-1/a10', 'ref.pth', None, 10, 0.02, {})
    assert ' '.join(train_cmd.args).count('--eval-cfg 0,1.5 --select-cfg 1.5') == 1
    assert '--cfg 0,1.5 --select-cfg 1.5' in ' '.join(backend.evaluation('ref.pth', 'ev.json', 'select', {}).args)
    assert backend.metric_label() == 'm:f (cfg=1.5)' and backend.evaluation_samples('select') == 20
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    rows = [{'iteration': 2, 'cfg=0': 5.0, 'cfg=1.5': 3.0, 'score': 3.0, 'best': 2},
            {'iteration': 4, 'cfg=0': 4.0, 'cfg=1.5': 3.5, 'score': 3.5, 'best': 2}]
    (run_dir / run_files.METRICS).write_text(''.join(json.dumps(r) + '\n' for r in rows))
    evaluations = backend.collect(str(run_dir))['evaluations']
    assert [(e['step'], e['score'], e['scores']) for e in evaluations] == [(2, 3.0, {'cfg=0': 5.0, 'cfg=1.5': 3.0}),
                                                                           (4, 3.5, {'cfg=0': 4.0, 'cfg=1.5': 3.5})]
    (tmp_path / 'ev.json').write_text(json.dumps({'net': 'ref.pth', 'cfg=0': 6.0, 'cfg=1.5': 4.0, 'score': 4.0, 'by': 'cfg=1.5'}))
    assert backend.read_evaluation(str(tmp_path / 'ev.json')) == 4.0
    assert backend.evaluation_scores(str(tmp_path / 'ev.json')) == {'cfg=0': 6.0, 'cfg=1.5': 4.0}


@pytest.mark.parametrize('evaluate, message', [
    ({'cfg': [0, 1.5], 'select_cfg': 2}, 'the selecting scale 2 is not one of the evaluated scales 0,1.5 (evaluate.cfg/evaluate.select_cfg)'),
    ({'cfg': [0, -1]}, 'bad guidance scales [0, -1]'),
    ({'cfg': [0], 'select_cfg': 'guided'}, "evaluate.select_cfg must be one of the guidance scales of evaluate.cfg, got 'guided'"),
])
def test_rounds_config_with_a_selecting_scale_not_evaluated_fails_in_one_line(tmp_path, evaluate, message):
    with pytest.raises(DDOPatchError) as err:
        rounds_config.load(var_config(tmp_path, **evaluate))
    assert message in str(err.value) and '\n' not in str(err.value)
