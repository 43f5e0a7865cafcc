"""`python -m var_ext.train` end to end on CPU with a tiny random VQVAE + VAR and a tokenised synthetic dataset."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ddo_patch.errors import DDOPatchError
from ddo_patch.preemption import EXIT_INTERRUPTED
from var_ext import models, train
from var_tiny import TINY, one_cpu_thread, tiny_checkpoints  # noqa: F401 (fixture)

pytestmark = [pytest.mark.upstream, pytest.mark.usefixtures('one_cpu_thread')]


@pytest.fixture(scope='module')
def files(var_root, tmp_path_factory):
    return tiny_checkpoints(str(tmp_path_factory.mktemp('tiny')))


def argv(files, outdir, *extra):
    vae, ckpt = files
    return ['--ref', ckpt, '--vae', vae, '--depth', '2', '--patch-nums', '1_2_3_4', '--num-classes', '10',
            '--vae-vocab', '64', '--vae-ch', '32', '--vae-z', '8', '--dataset', 'var_tiny:token_dataset',
            '--workers', '0', '--global-batch', '8', '--outdir', str(outdir), *extra]


def tensorboard_scalars(run_dir) -> dict:
    """{tag: [(step, value), ...]} of every event file under run_dir/tb, as TensorBoard reads them."""
    event_accumulator = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')
    events = event_accumulator.EventAccumulator(str(run_dir / 'tb'))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}


def test_round_writes_strict_var_checkpoints_logs_and_metrics(files, tmp_path, var_root, capsys):
    assert train.main(argv(files, tmp_path / 'run', '--iterations', '3', '--eval-every', '2', '--eval-samples', '10',
                           '--metric', 'var_tiny:brightness', '--eval-cfg', '0,1.5')) == 3
    run = tmp_path / 'run'
    log = [json.loads(line) for line in (run / 'log.jsonl').read_text().splitlines()]
    assert [r['iteration'] for r in log] == [1, 2, 3]
    printed = [float(line.split(' samples/s')[0].rsplit(' ', 1)[1]) for line in capsys.readouterr().out.splitlines() if 'samples/s' in line]
    assert printed == [pytest.approx(r['Timing/samples_per_s'], rel=5e-3) for r in log]   # 3 significant digits
    for key in ('Loss/loss', 'DDO/loss_real', 'DDO/loss_fake', 'DDO/accuracy_real', 'DDO/accuracy_fake',
                'DDO/saturated_real', 'DDO/saturated_fake', 'Timing/samples_per_s', 'Progress/lr', 'Timing/seconds_generate'):
        assert all(key in r for r in log)
    assert all(r['Faults/nonfinite_steps'] == 0 and 'Faults/loss_scale' not in r for r in log)   # fp32: no loss scale
    metrics = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [m['iteration'] for m in metrics] == [0, 2, 3] and all('cfg=0' in m and 'cfg=1.5' in m for m in metrics)
    assert all(m['score'] == m['cfg=0'] for m in metrics)   # --select-cfg 0 (the default): guidance-free selects
    # the same scalars in TensorBoard under upstream VAR's tags
    scalars = tensorboard_scalars(run)
    for key, tag in (('Loss/loss', 'AR_iter_loss/L'), ('DDO/delta_fake', 'AR_iter_ddo/delta_fake'),
                     ('Progress/lr', 'AR_opt_lr/lr_max/sche_tlr'), ('Loss/grad_norm', 'AR_opt_grad/grad/grad_norm')):
        assert scalars[tag] == [(r['iteration'], pytest.approx(r[key], rel=1e-6)) for r in log]
    assert scalars['AR_eval/cfg=1.5'] == [(m['iteration'], pytest.approx(m['cfg=1.5'], rel=1e-6)) for m in metrics]
    # a fresh upstream VAR (upstream's own builder) takes both checkpoints with strict=True
    import models as upstream_models
    with models.upstream_initialisation_disabled():
        _, fresh = upstream_models.build_vae_var(device='cpu', patch_nums=TINY.patch_nums, V=64, Cvae=8, ch=32,
                                                 num_classes=10, depth=2, shared_aln=False, attn_l2_norm=True)
    for name in ('var-ddo-last.pth', 'var-ddo-best.pth'):
        fresh.load_state_dict(torch.load(run / name, map_location='cpu'), strict=True)
    last = torch.load(run / 'var-ddo-last.pth')
    assert not torch.equal(last['head.weight'], torch.load(files[1])['head.weight'])   # it trained
    assert torch.load(run / 'training-state.pth', weights_only=False)['iteration'] == 3


def test_select_cfg_picks_the_best_checkpoint_by_that_scale(files, tmp_path):
    """Three scales evaluated, each recorded; the guided 1.5 selects: `score`, `best` and the resumable state follow
    cfg=1.5 only."""
    assert train.main(argv(files, tmp_path / 'run', '--iterations', '4', '--eval-every', '1', '--eval-samples', '10', '--lr', '3e-3',
                           '--metric', 'var_tiny:brightness', '--eval-cfg', '0,1.5,3', '--select-cfg', '1.5')) == 4
    metrics = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
    assert [m['iteration'] for m in metrics] == [0, 1, 2, 3, 4]
    assert all(sorted(k for k in m if k.startswith('cfg=')) == ['cfg=0', 'cfg=1.5', 'cfg=3'] for m in metrics)
    assert all(m['score'] == m['cfg=1.5'] for m in metrics)
    assert len({m['cfg=0'] for m in metrics}) > 1 and len({m['cfg=1.5'] for m in metrics}) > 1   # the scores move
    for i, m in enumerate(metrics):
        best = min(metrics[:i + 1], key=lambda r: (r['cfg=1.5'], r['iteration']))
        assert m['best'] == best['iteration']
    state = torch.load(tmp_path / 'run' / 'training-state.pth', weights_only=False)
    assert state['best'] == {'iteration': metrics[-1]['best'], 'score': min(m['cfg=1.5'] for m in metrics), 'by': 'cfg=1.5'}


def test_images_are_tokenised_through_the_vqvae(files, tmp_path):
    args = argv(files, tmp_path / 'images', '--iterations', '2', '--label-drop', '0')
    args[args.index('var_tiny:token_dataset')] = 'var_tiny:image_dataset'
    assert train.main(args) == 2
    log = [json.loads(line) for line in (tmp_path / 'images' / 'log.jsonl').read_text().splitlines()]
    assert log[0]['Loss/loss'] == pytest.approx(math.log(2) * (1 + 50), abs=1e-4) and log[1]['DDO/delta_real'] != 0


def test_gradient_accumulation_runs_micro_batches(files, tmp_path):
    assert train.main(argv(files, tmp_path / 'accum', '--iterations', '2', '--batch-gpu', '4', '--label-drop', '0')) == 2
    log = [json.loads(line) for line in (tmp_path / 'accum' / 'log.jsonl').read_text().splitlines()]
    assert log[0]['Loss/loss'] == pytest.approx(math.log(2) * (1 + 50), abs=1e-4)   # theta = theta_ref, no label dropped
    assert all(math.isfinite(r['Loss/grad_norm']) for r in log)


def test_mle_objective_is_the_same_run_with_upstreams_cross_entropy(files, tmp_path, var_root, capsys):
    """`--objective mle`, the matched control: its first loss is upstream's token cross-entropy of the starting model on
    the run's first batch (the same batch a DDO run draws first), it logs no DDO term, builds no reference, and its
    checkpoints and evaluations are the DDO run's files."""
    from ddo_patch.losses import sequence_log_likelihood
    from var_ext import datasets
    assert train.main(argv(files, tmp_path / 'mle', '--objective', 'mle', '--label-drop', '0', '--iterations', '3',
                           '--eval-every', '3', '--eval-samples', '6', '--eval-cfg', '0', '--metric', 'var_tiny:brightness',
                           '--seed', '4')) == 3
    run = tmp_path / 'mle'
    log = [json.loads(line) for line in (run / 'log.jsonl').read_text().splitlines()]
    assert not any(key.startswith('DDO/') for r in log for key in r) and all(math.isfinite(r['Loss/loss']) for r in log)
    assert '(mle) lr' in capsys.readouterr().out
    tokens, labels = token_dataset_first_batch(datasets, seed=4)
    vae, var = models.build(TINY, 'cpu')
    vae.load_state_dict(torch.load(files[0]))
    var.load_state_dict(torch.load(files[1]))
    with torch.no_grad():
        logits = var(labels, var.vae_quant_proxy[0].idxBl_to_var_input(datasets.split_scales(tokens, TINY.patch_nums)))
    expected = -sequence_log_likelihood(logits, tokens).mean() / tokens.shape[1]   # mean token cross-entropy
    assert log[0]['Loss/loss'] == pytest.approx(float(expected), rel=1e-5)
    assert log[-1]['Loss/loss'] < log[0]['Loss/loss']
    assert [json.loads(line)['iteration'] for line in (run / 'metrics.jsonl').read_text().splitlines()] == [0, 3]
    assert json.loads((run / 'training_options.json').read_text())['objective'] == 'mle'
    assert {'var-ddo-last.pth', 'var-ddo-best.pth', 'training-state.pth'} <= {p.name for p in run.iterdir()}


def token_dataset_first_batch(datasets, seed):
    from var_tiny import token_dataset
    tokens, labels = token_dataset(None).tensors
    index = next(iter(datasets.ResumableBatchSampler(len(labels), 8, 0, 1, seed, 0)))
    return tokens[index], labels[index]


@pytest.mark.parametrize('stop, objective', [(('--slice', '3'), 'ddo'), (('--stop-at', '3'), 'ddo'), (('--slice', '3'), 'mle')],
                         ids=['slice', 'stop-at', 'slice-mle'])
def test_resume_continues_from_the_saved_iteration(files, tmp_path, stop, objective):
    """A run left after iteration 3 (--slice: 3 iterations of this invocation; --stop-at: at iteration 3, as a rung
    of a halving sweep) and continued ends with the weights of an uninterrupted run, under either objective."""
    common = ('--iterations', '4', '--eval-every', '2', '--lr', '1e-3', '--objective', objective)
    assert train.main(argv(files, tmp_path / 'split', *common, *stop)) == 3
    assert torch.load(tmp_path / 'split' / 'training-state.pth', weights_only=False)['iteration'] == 3
    assert train.main(argv(files, tmp_path / 'split', *common)) == 4
    assert train.main(argv(files, tmp_path / 'whole', *common)) == 4
    split, whole = (torch.load(tmp_path / d / 'var-ddo-last.pth') for d in ('split', 'whole'))
    for key in whole:    # same data, reference samples, masks and optimiser state: the same weights
        torch.testing.assert_close(split[key], whole[key], atol=1e-6, rtol=1e-5)
    log = [json.loads(line)['iteration'] for line in (tmp_path / 'split' / 'log.jsonl').read_text().splitlines()]
    assert log == [1, 2, 3, 4]
    assert [step for step, _ in tensorboard_scalars(tmp_path / 'split')['AR_iter_loss/L']] == [1, 2, 3, 4]


@pytest.mark.parametrize('extra, message', [
    (('--depth', '1'), 'does not match --depth 1'),
    (('--patch-nums', '1_2_4'), 'pos_1LC (1, 30, 128) vs (1, 21, 128)'),
    (('--vae', 'no-such-vae.pth'), 'VQVAE file no-such-vae.pth not found'),
    (('--dataset', 'var_tiny:bad_label_dataset'), 'class labels must lie in [0, 10)'),
    (('--ddo-alpha', '-1'), 'alpha must be a finite number >= 0'),
    (('--ddo-beta', '0'), 'beta must be a finite number > 0'),
    (('--batch-gpu', '3'), '--batch-gpu 3 must divide the per-rank batch 8'),
    (('--eval-cfg', '0,1.5', '--select-cfg', '2'), 'the selecting scale 2 is not one of the evaluated scales 0,1.5 (--eval-cfg/--select-cfg)'),
    (('--eval-cfg', '0,-1'), "bad guidance scales '0,-1'; give distinct numbers >= 0, e.g. 0,1.5"),
    (('--eval-cfg', '0,0'), "bad guidance scales '0,0'"),
])
def test_bad_input_fails_in_one_line_and_writes_nothing(files, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv(files, tmp_path / 'run', '--iterations', '2', *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('error: ') and message in err[-1], err[-1]
    assert not (tmp_path / 'run').exists()


def test_data_with_a_broken_torchvision_fails_in_one_line(files, tmp_path, capsys, monkeypatch):
    """A torchvision built for another torch (`pip install torchvision==0.28.0` next to torch 2.13.0+cpu) fails on
    import with a RuntimeError, not an ImportError; --data must still stop with one line."""
    from test_var_options import broken_torchvision
    broken_torchvision(tmp_path, monkeypatch, 'raise RuntimeError("operator torchvision::nms does not exist")')
    args = argv(files, tmp_path / 'run', '--iterations', '2')
    args[args.index('--dataset'):args.index('--dataset') + 2] = ['--data', str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        train.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith('error: --data uses upstream') and 'torchvision::nms' in err[-1]
    assert not (tmp_path / 'run').exists()


def test_depth_mismatch_names_the_first_keys(files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(argv(files, tmp_path / 'run', '--depth', '3', '--iterations', '2'))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'shape (file vs flags): pos_start (1, 1, 128) vs (1, 1, 192)' in err and 'missing: blocks.2.attn' in err


def test_global_batch_must_split_over_ranks(files, tmp_path):
    args = train.parse_args(argv(files, tmp_path / 'run', '--global-batch', '10'))
    with pytest.raises(DDOPatchError, match='--global-batch 10 is not divisible by the world size 4'):
        train.validate(args, world_size=4)


def test_two_processes_under_torchrun_with_gloo(files, tmp_path, var_root, free_port):
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([os.path.dirname(__file__), os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port}', '-m', 'var_ext.train',
           *argv(files, tmp_path / 'ddp', '--iterations', '2', '--var-root', str(var_root), '--metric', 'var_tiny:brightness',
                 '--eval-samples', '6', '--eval-cfg', '0')]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(line) for line in (tmp_path / 'ddp' / 'log.jsonl').read_text().splitlines()]
    assert [r['iteration'] for r in log] == [1, 2]   # one record per iteration: rank 0 writes, averaged over ranks
    metrics = [json.loads(line) for line in (tmp_path / 'ddp' / 'metrics.jsonl').read_text().splitlines()]
    assert [m['iteration'] for m in metrics] == [0, 2]
    assert not any(p.name.startswith('eval-') for p in (tmp_path / 'ddp').iterdir())   # shards cleaned up


@pytest.mark.parametrize('signum', [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_checkpoints_every_finished_iteration_and_the_resumed_run_is_exact(files, tmp_path, signum):
    """What a cluster's preemption warning (SIGUSR1, Slurm's --signal) or its SIGTERM does: the iteration in progress
    finishes, the training state is written, the process exits with 75 ("resume me"); rerunning the command ends
    with exactly the weights of an uninterrupted run."""
    common = ('--iterations', '80', '--eval-every', '80', '--lr', '1e-3')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, '-m', 'var_ext.train', *argv(files, tmp_path / 'split', *common)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / 'split' / 'log.jsonl'
    deadline = time.time() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, out[-2000:]
    assert f'{signal.Signals(signum).name} received: the step in progress is done' in out
    saved = torch.load(tmp_path / 'split' / 'training-state.pth', weights_only=False)['iteration']
    assert 3 <= saved < 80 and saved == len(log.read_text().splitlines())   # every finished iteration kept, none lost
    assert train.main(argv(files, tmp_path / 'split', *common)) == 80
    assert train.main(argv(files, tmp_path / 'whole', *common)) == 80
    split, whole = (torch.load(tmp_path / d / 'var-ddo-last.pth') for d in ('split', 'whole'))
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], atol=1e-6, rtol=1e-5)
    assert [json.loads(line)['iteration'] for line in log.read_text().splitlines()] == list(range(1, 81))


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_iteration(files, tmp_path, var_root, free_port):
    """Two ranks under torchrun, SIGUSR1 to rank 1 alone: both leave after the same iteration (the state rank 0 writes
    counts every logged iteration), with status 75, instead of rank 0 waiting in an all-reduce that never comes."""
    import psutil
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([os.path.dirname(__file__), os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1'}
    out = tmp_path / 'ddp'
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port}',
                             '-m', 'var_ext.train', *argv(files, out, '--iterations', '200', '--eval-every', '200',
                                                          '--var-root', str(var_root))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / 'log.jsonl'
    deadline = time.time() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get('RANK') == '1']
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and 'exitcode  : 75' in output, output[-3000:]
    saved = torch.load(out / 'training-state.pth', weights_only=False)['iteration']
    assert 3 <= saved < 200 and saved == len(log.read_text().splitlines())


def test_nonfinite_steps_are_counted_and_too_many_in_a_row_stop_the_run(files, tmp_path, capsys, monkeypatch):
    """A loss forced to NaN makes every step non-finite: each is counted in log.jsonl, and the (max + 1)-th in a row
    stops the run with one line, before a NaN state is written."""
    from var_ext import trainer
    ddo_loss = trainer.ddo_loss
    monkeypatch.setattr(trainer, 'ddo_loss', lambda *args: (lambda loss, terms: (loss * float('nan'), terms))(*ddo_loss(*args)))
    with pytest.raises(SystemExit) as stop:
        train.main(argv(files, tmp_path / 'run', '--iterations', '8', '--max-nonfinite', '2'))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        'error: 3 consecutive steps had a non-finite loss or gradient norm (the last: iteration 3); the run diverged: '
        'lower --lr (or raise --max-nonfinite to let fp16 recover)']
    log = [json.loads(line) for line in (tmp_path / 'run' / 'log.jsonl').read_text().splitlines()]
    assert [(r['iteration'], r['Faults/nonfinite_steps']) for r in log] == [(1, 1), (2, 1)]
    assert not math.isfinite(log[0]['Loss/loss']) and not (tmp_path / 'run' / 'training-state.pth').exists()
