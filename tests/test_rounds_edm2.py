"""The round manager driving the real upstream EDM2 code on the CPU (tiny world of `edm2_ext.example`):
two rounds x two sweep points end to end, a manager SIGKILLed mid-generation, mid-training and
mid-evaluation that ends with the same manifest, a sweep point with a NaN loss, a round where every run fails.
The manager runs as a subprocess, exactly as users run it."""

import hashlib
import json
import pickle
import subprocess
import sys
import time

import pytest
import torch
from rounds_helpers import (
    TINY_CONFIG,
    comparable,
    manager,
    read_manifest,
    run_manager,
    variant,
)

pytestmark = pytest.mark.upstream

@pytest.fixture(scope='module')
def uninterrupted(world):
    workdir = world['root'] / 'uninterrupted'
    proc = run_manager(world, TINY_CONFIG, workdir)
    return dict(workdir=workdir, stdout=proc.stdout, manifest=read_manifest(workdir))


def test_two_rounds_two_points_promote_the_best_snapshot(uninterrupted):
    m, workdir = uninterrupted['manifest'], uninterrupted['workdir']
    assert m['status'] == 'done' and m['metric'] == 'fid' and m['step_unit'] == 'kimg' and len(m['rounds']) == 2
    for r in m['rounds']:
        assert r['status'] == 'done' and [run['name'] for run in r['runs']] == ['a1_b0.05', 'a4_b0.05']
        for run in r['runs']:
            assert run['status'] == 'done' and run['exit_status'] == 0 and run['images'] == 1024
            assert [e['step'] for e in run['evaluations']] == [1]   # kimg 0 is the reference: evaluated once per round
            assert run['best']['score'] == min(e['score'] for e in run['evaluations'])
            assert '-m edm2_ext.train' in run['commands'][0] and f'--ddo-alpha {run["alpha"]:g}' in run['commands'][0]
            assert '-m edm2_ext.evaluate' in run['commands'][1] and run['commands'][1].endswith('--skip-initial')
        chosen = r['chosen']
        assert chosen['score'] == min(run['best']['score'] for run in r['runs'])
        assert chosen['sha256'] == hashlib.sha256((workdir / chosen['snapshot']).read_bytes()).hexdigest()
    first, second = m['rounds']
    assert first['reference']['sha256'] == hashlib.sha256(open(first['reference']['path'], 'rb').read()).hexdigest()
    # Round 2 starts from round 1's chosen snapshot, with the score that chose it (the same file and seeds).
    assert second['reference'] == dict(path=first['chosen']['snapshot'], sha256=first['chosen']['sha256'],
                                       promoted_from=first['chosen']['run'])
    assert first['reference_evaluation']['source'] == 'evaluated' and second['reference_evaluation'] == dict(
        score=first['chosen']['score'], source='round 1')
    # Each round's reference samples have their own seeds, none of them an evaluation seed (0-63).
    assert [r['reference_samples']['seeds'] for r in m['rounds']] == ['1000000-1000063', '1000064-1000127']
    assert first['report']['reference']['seeds'] == '32-63' and second['report']['reference'] == dict(
        score=first['report']['chosen']['score'], snapshot=first['chosen']['snapshot'], purpose='report', source='round 1')
    assert first['report']['reference_noise']['seeds'] == '64-95' and 'reference_noise' not in second['report']
    # The matched control: each round once more from its reference, the same options with --objective mle (no
    # reference samples), evaluated like a sweep point, scored on the report seeds, never promoted.
    for r in m['rounds']:
        control = r['control']
        assert control['status'] == 'done' and control['images'] == 1024 and [e['step'] for e in control['evaluations']] == [1]
        assert '--objective mle' in control['commands'][0] and '--fake' not in control['commands'][0]
        assert f'--ref {r["reference"]["path"]} ' in control['commands'][0] and control['start']['path'] == r['reference']['path']
        assert r['report']['control']['score'] > 0 and r['chosen']['snapshot'] != control['chosen']['snapshot']
    assert f'--net {first["chosen"]["snapshot"]} ' in second['reference_samples']['command']
    assert all(f'--ref {first["chosen"]["snapshot"]} ' in run['commands'][0] for run in second['runs'])
    # In both rounds a sweep point beats its reference on the selection seeds and is promoted (what a 32-sample
    # pixel-projection "FID" can say; the report seeds show how noisy it is: benchmarks/digits.py measures quality).
    assert all(r['chosen']['run'] != 'reference' and r['chosen']['score'] < r['reference_score'] for r in m['rounds'])


def test_status_and_report(world, uninterrupted):
    workdir = uninterrupted['workdir']
    status = subprocess.run(manager(world, None, workdir, 'status'), env=world['env'], capture_output=True, text=True)
    assert status.returncode == 0 and 'done; backend edm2, 2 of at most 2 rounds' in status.stdout
    assert status.stdout.count('runs done 2, failed 0, pending 0') == 2
    report = subprocess.run(manager(world, None, workdir, 'report'), env=world['env'], capture_output=True, text=True)
    assert report.returncode == 0
    png = workdir / 'report.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 10000
    # each round's diagnostics: the sweep points' and the control's terms read back through the EDM2 backend
    for number in (1, 2):
        assert (workdir / f'report-diagnostics-round{number:02d}.png').stat().st_size > 10000
        assert f'report-diagnostics-round{number:02d}.png' in report.stdout
    assert '\nDiagnostics' in (workdir / 'report.md').read_text()
    rows = [line for line in (workdir / 'report.md').read_text().splitlines() if line.startswith('| 1 |') or line.startswith('| 2 |')]
    chosen = uninterrupted['manifest']['rounds'][0]['chosen']
    # 2 runs and the control x 1024 images per round against the tiny MLE run's 1024 images: 100% per run, 300% then
    # 600% in all
    report = uninterrupted['manifest']['rounds'][0]['report']
    assert (f'| {chosen["run"]} | {chosen["score"]:.4g} | no | {report["reference"]["score"]:.4g} | '
            f'{report["chosen"]["score"]:.4g} | 3072 | 100% | 300% |') in rows[0]
    # Cost in MLE-image equivalents: 2048 DDO images at 2.5, the control's 1024 at 1, and every generated sample at
    # 31/3 (16 Heun steps: 31 network evaluations, a third of a training image each): 64 reference samples, 32 per
    # evaluation of each run and of the control, of the reference, of the reference, the chosen snapshot and the
    # control's on the report seeds, and of the reference on the noise seeds.
    first = uninterrupted['manifest']['rounds'][0]['cost']
    assert (first['train_images'], first['reference_samples'], first['evaluation_samples']) == (3072, 64, 8 * 32)
    assert first['mle_equivalents'] == pytest.approx(2048 * 2.5 + 1024 + (64 + 8 * 32) * 31 / 3)
    assert rows[0].endswith(f'| {first["mle_equivalents"]:.4g} |')
    assert '| 3072 | 100% | 600% |' in rows[1]   # round 2's reference and its report score are shared: cheaper
    control = uninterrupted['manifest']['rounds'][0]['control']['chosen']
    assert (f'| 1 | {chosen["score"]:.4g} ({chosen["run"]}) | {control["score"]:.4g} ({control["run"]}) | '
            f'{chosen["score"] - control["score"]:+.4g} | {report["chosen"]["score"]:.4g} | {report["control"]["score"]:.4g} |') \
        in report_text(workdir)
    assert f'the pretrained model scores {report["reference"]["score"]:.4g} on the report seeds' in report_text(workdir)


def report_text(workdir):
    return (workdir / 'report.md').read_text()


def _kill_when(args, env, ready, log, timeout=180):
    """Start the manager, SIGKILL it (only it: its job is orphaned, as after an OOM kill) once `ready()`."""
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.kill()
            proc.wait()
            return True
        time.sleep(0.02)
    proc.wait()
    return False


def _weights(path):
    with open(path, 'rb') as f:
        return pickle.load(f)['ema'].state_dict()


def test_sigkilled_manager_resumes_to_the_same_manifest(world, uninterrupted, edm2_root):
    from ddo_patch import upstream
    upstream.activate('edm2', edm2_root)   # to unpickle the snapshots below
    workdir = world['root'] / 'killed'
    args = manager(world, TINY_CONFIG, workdir)
    fake = workdir / 'round01' / 'reference-samples.zip'
    run = workdir / 'round01' / 'a1_b0.05'
    kill_points = {
        'mid-generation': lambda: not fake.exists() and len(list(fake.parent.glob('*.partial/*/*.png'))) >= 16,
        'mid-training': lambda: (run / 'stats.jsonl').exists() and not (run / 'training-state-0000001.pt').exists(),
        'mid-evaluation': lambda: (run / 'training-state-0000001.pt').exists() and not (run / 'eval.json').exists(),
    }
    with open(world['root'] / 'killed.log', 'w') as log:
        for name, ready in kill_points.items():
            assert _kill_when(args, world['env'], ready, log), f'the manager finished before the {name} kill'
    partial_pngs = len(list(fake.parent.glob('*.partial/*/*.png')))
    assert partial_pngs == 0 and fake.exists()
    run_manager(world, TINY_CONFIG, workdir)
    resumed = read_manifest(workdir)
    assert comparable(resumed) == comparable(uninterrupted['manifest'])   # every score, choice and command
    # and the manifest counts what was interrupted: the first round's samples once, a1 in training and in evaluation
    assert [r['reference_samples']['interruptions'] for r in resumed['rounds']] == [1, 0]
    assert [[run['interruptions'] for run in r['runs']] for r in resumed['rounds']] == [[2, 0], [0, 0]]
    for r in resumed['rounds']:   # and every run's best snapshot has exactly the weights of the uninterrupted one
        for run in r['runs']:
            best = run['best']['snapshot']
            assert run['best']['sha256'] == hashlib.sha256((workdir / best).read_bytes()).hexdigest()
            assert _weights(workdir / best).keys() == _weights(uninterrupted['workdir'] / best).keys()
            for key, value in _weights(workdir / best).items():
                assert torch.equal(value, _weights(uninterrupted['workdir'] / best)[key]), (best, key)


NO_CONTROL = {'objective = "mle"': '', 'noise_seeds = "64-95"': ''}   # what these tests check needs neither


def test_nan_loss_point_fails_and_the_round_goes_on(world):
    config = variant(world, 'nan.toml', **{'rounds = 2': 'rounds = 1', 'alpha = [1, 4]': 'alpha = [1, 1e39]', **NO_CONTROL})
    workdir = world['root'] / 'nan'
    proc = run_manager(world, config, workdir)
    m = read_manifest(workdir)
    runs = {run['name']: run for run in m['rounds'][0]['runs']}
    failed = runs['a1e+39_b0.05']
    # the run stopped itself after 21 non-finite steps in a row (--max-nonfinite 20); the manager records its one line
    assert failed['status'] == 'failed' and failed['exit_status'] == 2 and failed['best'] is None
    assert failed['error'].startswith('21 consecutive steps had non-finite gradients (upstream zeroed them; the last ended at '
                                      '0.672 kimg); the run diverged: lower --lr (or raise --max-nonfinite); exit status 2 (log: ')
    assert runs['a1_b0.05']['status'] == 'done' and m['rounds'][0]['chosen']['run'] == 'a1_b0.05'
    assert m['status'] == 'done' and 'a1e+39_b0.05: failed (21 consecutive steps had non-finite gradients' in proc.stdout


def test_round_where_every_run_fails_stops_with_a_clear_message(world):
    config = variant(world, 'all-fail.toml', **{'rounds = 2': 'rounds = 1', 'alpha = [1, 4]': 'alpha = [1e39]',
                                                'count = 64': 'count = 4', **NO_CONTROL})
    workdir = world['root'] / 'all-fail'
    proc = run_manager(world, config, workdir, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1
    assert lines[0].startswith('error: round 1: all 1 runs failed (a1e+39_b0.05: 21 consecutive steps had non-finite gradients')
    assert lines[0].endswith('nothing to promote, stopping (fix the cause, then rerun with --retry-failed)')
    m = read_manifest(workdir)
    assert m['status'] == 'failed' and m['stop_reason'] == 'every run of round 1 failed'
    log = workdir / 'round01' / 'a1e+39_b0.05.log'
    size = log.stat().st_size
    again = run_manager(world, config, workdir, check=False)   # a failed run is final: nothing runs again
    assert again.returncode == 2 and again.stderr == proc.stderr and log.stat().st_size == size
    args = manager(world, config, workdir) + ['--retry-failed']
    retried = subprocess.run(args, env=world['env'], capture_output=True, text=True, timeout=600)
    assert retried.returncode == 2 and retried.stderr == proc.stderr and log.stat().st_size > size   # it ran again


def test_racing_scores_the_finalists_as_a_full_evaluation_would(world):
    """Racing on real EDM2 snapshots: two points, a snapshot each at 1 and 2 kimg, levels of 8 and 16 of the 32
    selection seeds. Every snapshot starts on 8 samples; the finalists' scores on all 32 equal a plain
    `edm2_ext.evaluate` of the same snapshot (the stored features extend level by level, in seed order)."""
    config = variant(world, 'racing.toml', **{'rounds = 2': 'rounds = 1', 'duration = "1Ki"': 'duration = "2Ki"',
                                              'metric = "fid"': 'metric = "fid"\npolicy = "racing"\nrace_samples = [8, 16]\nrace_groups = 4',
                                              'report_seeds = "32-63"': '', **NO_CONTROL})
    workdir = world['root'] / 'racing'
    run_manager(world, config, workdir)
    r = read_manifest(workdir)['rounds'][0]
    evaluations = [e for run in r['runs'] for e in run['evaluations']]
    assert sorted((e['step'], e['samples'] in (8, 16, 32)) for e in evaluations) == [(1, True), (1, True), (2, True), (2, True)]
    assert [level['samples'] for level in r['race']['levels']][:1] == [8] and r['race']['levels'][0]['racing'] == 4
    finals = [e for e in evaluations if e['status'] == 'final']
    assert finals and all(e['samples'] == 32 for e in finals) and r['chosen']['score'] == min(e['score'] for e in finals)
    assert all(e['samples'] < 32 and e['reason'].startswith('P(beats ') for e in evaluations if e['status'] == 'stopped')
    dest = workdir / 'check.json'
    subprocess.run([sys.executable, '-m', 'edm2_ext.evaluate', '--net', r['chosen']['snapshot'], '--ref', str(world['stats']),
                    '--dest', str(dest), '--seeds', '0-31', '--batch', '32', '--steps', '16',
                    '--detector', 'fid=edm2_ext.example:PixelProjection'], cwd=workdir, env=world['env'], check=True,
                   capture_output=True, timeout=300)
    assert json.loads(dest.read_text())['results'][0]['fid'] == pytest.approx(r['chosen']['score'], rel=1e-6)
    # the samples each snapshot reached, and the reference's evaluation on the selection seeds
    assert r['cost']['evaluation_samples'] == sum(e['samples'] for e in evaluations) + 32
