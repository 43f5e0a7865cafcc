"""The round manager driving `var_ext.train` (real upstream VAR modules, CPU): two rounds x two sweep points
with the tiny random VQVAE + VAR and the synthetic token data of `var_tiny`, selection from the
trainer's own evaluations (`metrics.jsonl`, `var-ddo-best.pth`) by the guided scale of two evaluated ones, every
scale's score in the manifest, the best checkpoint promoted."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from rounds_helpers import read_manifest, write_config

pytestmark = pytest.mark.upstream
TESTS = os.path.dirname(os.path.abspath(__file__))
ITERATIONS, EVAL_EVERY, BATCH = 4, 2, 8


@pytest.fixture(scope='module')
def var_run(var_root, tmp_path_factory):
    from var_tiny import tiny_checkpoints
    root = tmp_path_factory.mktemp('rounds-var')
    vae, ckpt = tiny_checkpoints(str(root))
    config = write_config(root / 'var.toml', dict(backend='var_ext.rounds_backend.RoundsBackend', rounds=2, pretrained=ckpt, pretraining_images=1024), dict(
        run=dict(duration=ITERATIONS, eval_every=EVAL_EVERY), sweep=dict(alpha=[10, 50], beta=[0.02]),
        train=dict(depth=2, vae=vae, patch_nums='1_2_3_4', num_classes=10, vae_vocab=64, vae_ch=32, vae_z=8,
                   dataset='var_tiny:token_dataset', workers=0, global_batch=BATCH, lr=1e-3),
        control=dict(objective='mle', label_drop=0.1),
        evaluate=dict(metric='var_tiny:brightness', samples=10, cfg=[0, 1.5], select_cfg=1.5),
        launcher=dict(kind='local', nproc_per_node=1, env={'OMP_NUM_THREADS': '1'})))
    env = dict(os.environ, VAR_ROOT=str(var_root), PYTHONPATH=os.pathsep.join(filter(None, [TESTS, os.environ.get('PYTHONPATH')])))
    workdir = root / 'work'
    proc = subprocess.run([sys.executable, '-m', 'ddo_patch.cli', 'rounds', 'run', config, '--workdir', str(workdir)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(workdir=workdir, ckpt=ckpt, vae=vae, env=env, manifest=read_manifest(workdir))


def test_rounds_choose_from_the_trainers_evaluations_and_promote_the_best_checkpoint(var_run):
    m, workdir = var_run['manifest'], var_run['workdir']
    assert m['status'] == 'done' and m['metric'] == 'var_tiny:brightness (cfg=1.5)' and m['step_unit'] == 'iterations'
    first, second = m['rounds']
    assert first['reference']['path'] == var_run['ckpt'] and first['reference_samples'] is None   # sampled online
    assert second['reference'] == dict(path=first['chosen']['snapshot'], sha256=first['chosen']['sha256'],
                                       promoted_from=first['chosen']['run'])
    assert all(f'--ref {first["chosen"]["snapshot"]} ' in run['commands'][0] for run in second['runs'])
    # The reference is scored once, by var_ext.evaluate in round 1; round 2 takes the score round 1 chose with.
    assert first['reference_evaluation']['source'] == 'evaluated' and first['reference_evaluation']['seeds'] == '0-9'
    assert '-m var_ext.evaluate --net ' + var_run['ckpt'] in first['reference_evaluation']['command']
    assert '--cfg 0,1.5 --select-cfg 1.5' in first['reference_evaluation']['command']
    scores = first['reference_evaluation']['scores']
    assert sorted(scores) == ['cfg=0', 'cfg=1.5'] and first['reference_evaluation']['score'] == scores['cfg=1.5'] != scores['cfg=0']
    assert second['reference_evaluation'] == dict(score=first['chosen']['score'], source='round 1')
    for r in m['rounds']:
        _check_round(workdir, r)
        # The matched control: var_ext.train --objective mle from the round's reference, [control]'s label dropout on
        # top of [train]'s options, evaluated at every scale like the sweep points, never promoted.
        control = r['control']
        assert control['status'] == 'done' and [e['step'] for e in control['evaluations']] == [2, 4]
        assert '--objective mle' in control['commands'][0] and '--label-drop 0.1' in control['commands'][0]
        assert '--ddo-alpha' not in control['commands'][0] and sorted(control['evaluations'][0]['scores']) == ['cfg=0', 'cfg=1.5']
        assert control['chosen']['run'] == 'start' or control['chosen']['snapshot'].startswith(f'{r["dir"]}/control/')
        # round r trains with seed + 1000 (r - 1): a round from the same start draws other batches and samples
        assert all(f'--seed {1000 * (r["round"] - 1)}' in run['commands'][0] for run in r['runs'] + [control])
    assert not second['reference']['path'].startswith('round01/control/')


def test_var_evaluate_scores_a_checkpoint_as_the_trainer_does(var_run, tmp_path):
    """The reference's score (var_ext.evaluate) and the runs' scores (var_ext.train's evaluations) are compared with
    each other, so the two must agree on the same weights: here on round 1's chosen checkpoint."""
    chosen = var_run['manifest']['rounds'][0]['chosen']
    dest = tmp_path / 'eval.json'
    proc = subprocess.run([sys.executable, '-m', 'var_ext.evaluate', '--net', str(var_run['workdir'] / chosen['snapshot']),
                           '--vae', var_run['vae'], '--depth', '2', '--patch-nums', '1_2_3_4', '--num-classes', '10',
                           '--vae-vocab', '64', '--vae-ch', '32', '--vae-z', '8', '--metric', 'var_tiny:brightness',
                           '--seeds', '0-9', '--cfg', '0,1.5', '--select-cfg', '1.5', '--dest', str(dest)],
                          env=var_run['env'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(dest.read_text())
    assert report['score'] == report['cfg=1.5'] == pytest.approx(chosen['score'], rel=1e-6) and report['by'] == 'cfg=1.5'
    expected = chosen.get('scores') or var_run['manifest']['rounds'][0]['reference_evaluation']['scores']   # kept: the reference's
    assert report['cfg=0'] == pytest.approx(expected['cfg=0'], rel=1e-6)


def _check_round(workdir, r):
    assert [run['name'] for run in r['runs']] == ['a10_b0.02', 'a50_b0.02']
    for run in r['runs']:
        assert run['status'] == 'done' and run['images'] == ITERATIONS * BATCH
        assert f'-m var_ext.train --outdir {r["dir"]}/{run["name"]} --ref {r["reference"]["path"]} --ddo-alpha {run["alpha"]:g}' in run['commands'][0]
        assert '--eval-cfg 0,1.5 --select-cfg 1.5' in run['commands'][0]
        rows = [json.loads(line) for line in (workdir / run['run_dir'] / 'metrics.jsonl').read_text().splitlines()]
        assert [e['step'] for e in run['evaluations']] == [row['iteration'] for row in rows] == [2, 4]   # not the reference
        assert [e['score'] for e in run['evaluations']] == [row['score'] for row in rows] == [row['cfg=1.5'] for row in rows]
        assert [e['scores'] for e in run['evaluations']] == [{'cfg=0': row['cfg=0'], 'cfg=1.5': row['cfg=1.5']} for row in rows]
        best = min(rows, key=lambda row: (row['cfg=1.5'], row['iteration']))
        assert (run['best']['step'], run['best']['score']) == (best['iteration'], best['cfg=1.5']) and best['iteration'] == rows[-1]['best']
        assert run['best']['snapshot'] == f'{run["run_dir"]}/var-ddo-best.pth'
        assert run['best']['sha256'] == hashlib.sha256((workdir / run['best']['snapshot']).read_bytes()).hexdigest()
    best = min(run['best']['score'] for run in r['runs'])
    if best < r['reference_score']:
        assert r['chosen']['score'] == best and r['chosen']['run'] != 'reference'
    else:   # no sweep point beat the reference: it is kept
        assert (r['chosen']['run'], r['chosen']['snapshot']) == ('reference', r['reference']['path'])
