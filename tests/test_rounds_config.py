"""The round manager without upstream: config validation, per-round overrides, the paper configs, job
scripts, and the SLURM path end to end with fake sbatch/squeue and hand-made run results."""

import hashlib
import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from ddo_patch.rounds import config as rounds_config
from ddo_patch.rounds import launch as rounds_launch
from ddo_patch.rounds import manifest, sweep
from ddo_patch.cli import main
from ddo_patch.rounds.manager import _stalled, _stop_reason
from edm2_ext.presets import resolve
from rounds_helpers import check_halving_round, cli_runner, comparable, halving_config, install_fake_slurm, read_manifest, write_config

EDM2 = 'edm2_ext.rounds_backend.RoundsBackend'
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


@pytest.fixture
def files(tmp_path):
    for name in ('ref.pkl', 'stats.pkl', 'data.zip'):
        (tmp_path / name).write_bytes(b'x')
    return tmp_path


def edm2_config(files, **changes):
    top = dict(backend=EDM2, rounds=2, pretrained='ref.pkl', data='data.zip')
    tables = dict(run=dict(duration='2Ki', eval_every='1Ki'), sweep=dict(alpha=[1, 2], beta=[0.05]),
                  evaluate=dict(metric='fid', reference='stats.pkl'))
    for key, value in changes.items():
        table, _, name = key.rpartition('__')
        target = tables.setdefault(table, {}) if table else top
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
    return write_config(files / 'run.toml', top, tables)


@pytest.mark.parametrize('changes, message', [
    (dict(backend='stylegan'), "unknown backend 'stylegan'"),
    (dict(sweep__alpha=[]), 'sweep.alpha must be a non-empty list'),
    (dict(sweep__alpha=[1, -0.5]), 'sweep.alpha value must be >= 0, got -0.5'),
    (dict(sweep__beta=[0]), 'sweep.beta value must be > 0, got 0'),
    (dict(rounds=0), 'rounds must be an integer >= 1'),
    (dict(pretrained='missing.pkl'), 'pretrained'),
    (dict(evaluate__reference=None), 'evaluate.reference'),
    (dict(train__P_sdt=3.0), 'unknown edm2 train option P_sdt'),
    (dict(run__eval_every='1000'), 'multiple of 1024'),
    (dict(run__duration='3Ki', run__eval_every='2Ki'), 'must be a multiple of run.eval_every'),
    (dict(launcher__kind='kubernetes'), 'unknown launcher.kind'),
    (dict(launcher__kind='slurm', launcher__signal_lead=-60), 'launcher.signal_lead must be an integer >= 0, got -60'),
    (dict(launcher__kind='slurm', launcher__template='#!/bin/bash\n'), 'must contain {{commands}}'),
    (dict(data='${NO_SUCH_VARIABLE_HERE}/x.zip'), '${NO_SUCH_VARIABLE_HERE}, which is not set'),
    (dict(reference_samples__first_seed=49000), 'evaluate.seeds and the reference samples of rounds 1-2 share seed 49000'),
    (dict(evaluate__report_seeds='49990-50009'), 'evaluate.seeds and evaluate.report_seeds share seed 49990 (10 in all)'),
    (dict(reference_samples__seeds='0-63'), 'unknown reference_samples option seeds; known: count, first_seed, batch, steps'),
    (dict(control__objective='ddo'), 'control.objective must be "mle"'),
    (dict(control__objective='mle', control__start='pretrained'), 'control.start must be "reference"'),
    (dict(control__objective='mle', control__label_drop=0.1), 'unknown edm2 control option label_drop'),
    (dict(evaluate__noise_seeds='200000-200099'), 'evaluate.noise_seeds measures the noise of the report seeds'),
    (dict(evaluate__report_seeds='100000-100099', evaluate__noise_seeds='200000-200049'),
     'evaluate.noise_seeds must be as many seeds as evaluate.report_seeds'),
    (dict(evaluate__report_seeds='100000-100099', evaluate__noise_seeds='100050-100149'),
     'evaluate.report_seeds and evaluate.noise_seeds share seed 100050'),
    (dict(evaluate__policy='sometimes'), "unknown evaluate.policy 'sometimes'; choose full"),
    (dict(evaluate__race_samples=[100]), 'evaluate.race_samples are for evaluate.policy = "racing"'),
    (dict(evaluate__policy='racing'), 'evaluate.race_samples must be increasing sample counts'),
    (dict(evaluate__policy='racing', evaluate__race_samples=[2000, 1000]), 'evaluate.race_samples must be increasing'),
    (dict(evaluate__policy='racing', evaluate__seeds='0-999', evaluate__race_samples=[100, 1000]),
     "evaluate.race_samples must lie below the selection seeds' count 1000, got [100, 1000]"),
    (dict(evaluate__policy='racing', evaluate__race_samples=[100], evaluate__race_threshold=1.5),
     'evaluate.race_threshold is a probability in (0, 1), got 1.5'),
    (dict(evaluate__policy='racing', evaluate__race_samples=[8, 100], evaluate__race_groups=10),
     "evaluate.race_groups (jackknife groups) must be an integer from 2 to the first level's 8 samples, got 10"),
    (dict(sweep__policy='random'), 'sweep.policy = "random" needs sweep.count, an integer >= 1, got None'),
    (dict(train__precision='fp8'), "train.precision must be one of fp32, "),
    (dict(sweep__count=2), 'sweep.count and sweep.seed are for policy = "random"'),
    (dict(sweep__policy='random', sweep__count=1, sweep__rungs=['1Ki']), 'sweep.rungs and sweep.keep are for policy = "halving"'),
])
def test_invalid_config_is_one_line_and_runs_nothing(files, changes, message):
    config = edm2_config(files, **changes)
    workdir = files / 'work'
    result = cli_runner().invoke(main, ['rounds', 'run', config, '--workdir', str(workdir)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], result.stderr
    assert not workdir.exists()


def test_overrides_apply_from_their_round_in_order(files):
    path = write_config(files / 'o.toml', dict(backend=EDM2, rounds=28, pretrained='ref.pkl', data='data.zip'),
                        dict(run=dict(duration='1Ki', eval_every='1Ki'), sweep=dict(alpha=[1], beta=[0.1]),
                             train=dict(P_std=1.6, lr=1e-4), evaluate=dict(metric='fid', reference='stats.pkl')),
                        [('override', dict(from_round=22, P_std=3.0)), ('override', dict(from_round=18, P_std=2.0)),
                         ('override', dict(from_round=25, lr=5e-5))])
    cfg = rounds_config.load(path)
    assert [cfg.round_options(r)['P_std'] for r in (1, 17, 18, 21, 22, 28)] == [1.6, 1.6, 2.0, 2.0, 3.0, 3.0]
    assert [cfg.round_options(r)['lr'] for r in (24, 25)] == [1e-4, 5e-5]
    assert cfg.data == str(files / 'data.zip')   # relative to the config file


def test_paper_configs_encode_appendix_c(tmp_path, monkeypatch):
    for name in ('img64.zip', 'img512-sd.zip', 'var_d16.pth', 'var_d30.pth', 'vae_ch160v4096z32.pth'):
        (tmp_path / name).write_bytes(b'x')
    (tmp_path / 'imagenet').mkdir()
    monkeypatch.setenv('DATASETS', str(tmp_path))
    monkeypatch.setenv('CHECKPOINTS', str(tmp_path))
    img64 = rounds_config.load(os.path.join(CONFIGS, 'edm2-img64-s.toml'))
    assert img64.rounds == 24 and img64.duration == 6400 << 10 and img64.eval_every == 1 << 17
    assert min(img64.alphas) == 0.5 and max(img64.alphas) == 6 and min(img64.betas) == 0.01 and max(img64.betas) == 0.1
    img512 = rounds_config.load(os.path.join(CONFIGS, 'edm2-img512-l.toml'))
    assert img512.rounds == 28 and img512.eval_every == 1 << 18
    # One schedule: the configs name the preset and set none of its per-round values; the manager passes --round,
    # so appendix C's changes (edm2_ext.presets) reach every round's command line.
    for cfg, changes in ((img64, {16: (1.6, 5e-5), 17: (3.0, 2e-5)}),
                         (img512, {17: (1.6, 1e-4), 18: (2.0, 1e-4), 22: (3.0, 1e-4), 25: (3.0, 5e-5)})):
        assert not cfg.overrides and not {'lr', 'P_std', 'P_mean'} & set(cfg.train)
        backend = cfg.make_backend()
        for round_idx, values in changes.items():
            train = backend.run_commands(round_idx, 'r', 'ref.pkl', 'fake.zip', 1, 0.05, cfg.round_options(round_idx))[0].args
            assert train[train.index('--round') + 1] == str(round_idx) and '--lr' not in train and '--P_std' not in train
            hp = resolve(cfg.train['preset'], round_idx)
            assert (hp['P_std'], hp['lr']) == values
    for name, depth in (('var-d16.toml', 16), ('var-d30.toml', 30)):
        var = rounds_config.load(os.path.join(CONFIGS, name))
        assert var.rounds == 2 and var.duration == 80 and var.eval_every == 4 and var.betas == [0.02]
        assert var.train['depth'] == depth and var.train['lr'] == 4e-6 and var.train['global_batch'] == 1024
        assert min(var.alphas) >= 10 and max(var.alphas) <= 100
        # the matched control at VAR's own label dropout, with DDO's learning rate, batch and schedule
        assert var.control == dict(objective='mle', start='reference', options=dict(label_drop=0.1))
        assert var.control_options(1)['lr'] == 4e-6 and var.control_options(1)['label_drop'] == 0.1
    for cfg in (img64, img512):
        control = cfg.make_backend().run_commands(1, 'r/control', 'ref.pkl', None, None, None, cfg.control_options(1),
                                                  objective='mle')[0].args
        assert '--objective' in control and '--fake' not in control and control[control.index('--round') + 1] == '1'


def test_stop_rule_counts_consecutive_stalled_rounds(files):
    cfg = rounds_config.load(edm2_config(files, stop__min_improvement=0.1, stop__patience=2))
    # A round stalls when it keeps its reference, or improves by no more than min_improvement (<=, not <).
    stalled = [_stalled(cfg, dict(chosen=dict(run=run), improvement=v))
               for run, v in (('a1_b0.05', 1.0), ('a1_b0.05', 0.1), ('a2_b0.05', 0.5), ('reference', 0.0))]
    assert stalled == [False, True, False, True]
    rounds = [dict(stalled=v) for v in stalled]
    assert _stop_reason(cfg, rounds) is None
    assert 'no improvement above 0.1 for 2 round(s)' in _stop_reason(cfg, rounds + [dict(stalled=True)])


SLURM_TEMPLATE = '''#!/bin/bash
#SBATCH --job-name={{job_name}}
#SBATCH --nodes={{nodes}}
#SBATCH --gpus-per-node={{nproc_per_node}}
#SBATCH --output={{log}}
{{commands}}
'''


def _finish_run(workdir, run_dir, scores, exit_status=0):
    """What a finished EDM2 sweep-point job leaves behind: snapshots, eval.json (kimg 1, 2, ...: the starting point
    is the reference, which the manager evaluates once per round), and its status file."""
    os.makedirs(workdir / run_dir)
    results = []
    for kimg, score in enumerate(scores, start=1):
        name = f'network-snapshot-{kimg:07d}-0.050.pkl'
        (workdir / run_dir / name).write_bytes(f'{run_dir} {kimg}'.encode())
        results.append({'snapshot': name, 'fid': score})
    (workdir / run_dir / 'eval.json').write_text(json.dumps({'results': results}))
    (workdir / f'{run_dir}.status').write_text(json.dumps({'exit_status': exit_status, 'wall_seconds': 5}))


def _finish_evaluation(workdir, name, score):
    """What a finished evaluation job of one snapshot leaves behind (edm2_ext.evaluate --dest)."""
    (workdir / f'{name}.json').write_text(json.dumps({'results': [{'snapshot': 'x.pkl', 'fid': score}]}))
    (workdir / f'{name}.status').write_text(json.dumps({'exit_status': 0, 'wall_seconds': 5}))


def test_slurm_scripts_submission_resubmission_and_read_back(files, tmp_path, monkeypatch):
    state = install_fake_slurm(tmp_path, monkeypatch)
    config = edm2_config(files, rounds=1, sweep__alpha=[1, 2, 3], launcher__kind='slurm', launcher__nodes=2,
                         launcher__nproc_per_node=8, launcher__template=SLURM_TEMPLATE, launcher__poll_seconds=0.01,
                         launcher__env={'NCCL_DEBUG': 'WARN'})
    workdir = tmp_path / 'work'
    cli = ['rounds', 'run', config, '--workdir', str(workdir), '--no-wait']
    submitted = lambda: (state / 'submitted').read_text().splitlines()  # noqa: E731

    assert cli_runner().invoke(main, cli).exit_code == 0   # submits the reference samples and evaluation, returns
    assert [line.split()[1] for line in submitted()] == [str(workdir / 'round01' / f'{name}.sh')
                                                         for name in ('reference-samples', 'reference-evaluation')]
    script = (workdir / 'round01' / 'reference-samples.sh').read_text()
    assert '#SBATCH --job-name=round01-reference-samples\n#SBATCH --nodes=2\n#SBATCH --gpus-per-node=8' in script
    assert f'#SBATCH --output={workdir}/round01/reference-samples.log' in script
    assert 'export NCCL_DEBUG=WARN' in script and 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert ('srun --ntasks-per-node=1' in script and '-m torch.distributed.run --nnodes=2 --nproc_per_node=8 '
            '--rdzv_backend=c10d --rdzv_id="$SLURM_JOB_ID" --rdzv_endpoint="$head_node:$rdzv_port" -m edm2_ext.generate' in script)
    reference_evaluation = (workdir / 'round01' / 'reference-evaluation.sh').read_text()
    assert f'-m edm2_ext.evaluate --net {files / "ref.pkl"} --ref {files / "stats.pkl"}' in reference_evaluation
    assert cli_runner().invoke(main, cli).exit_code == 0   # still queued: nothing submitted again
    assert len(submitted()) == 2

    (workdir / 'round01' / 'reference-samples.status').write_text('{"exit_status": 0, "wall_seconds": 60}')
    _finish_evaluation(workdir, 'round01/reference-evaluation', 9.0)
    assert cli_runner().invoke(main, cli).exit_code == 0   # samples and reference score there: one job per sweep point
    assert [line.split()[1] for line in submitted()[2:]] == [str(workdir / 'round01' / f'a{a}_b0.05.sh') for a in (1, 2, 3)]
    train = (workdir / 'round01' / 'a2_b0.05.sh').read_text()
    assert "[ ! -e round01/a2_b0.05/training-state-0000002.pt ]; then" in train
    # warned 300 s before its end (the default lead), the job passes the warning on to its steps and requeues itself
    assert all('--signal=B:USR1@300 ' in line for line in (state / 'options').read_text().splitlines())
    assert 'trap \'warned=1 signalled=1; scancel --signal=TERM "$SLURM_JOB_ID"\' USR1' in train
    assert '--skip-initial &\n  child=$!\n' in train and 'then scontrol requeue "$SLURM_JOB_ID"; fi' in train
    assert '-m edm2_ext.train --outdir round01/a2_b0.05' in train and '--ddo-alpha 2 --ddo-beta 0.05 --round 1' in train
    assert '-m edm2_ext.evaluate --net round01/a2_b0.05' in train and train.rstrip().count('--skip-initial') == 1

    (state / 'queued').write_text('')   # every job left the queue; only two wrote a status
    _finish_run(workdir, 'round01/a1_b0.05', [7.0, 8.0])
    _finish_run(workdir, 'round01/a3_b0.05', [7.0, 7.0], exit_status=1)
    assert cli_runner().invoke(main, cli).exit_code == 0
    assert submitted()[-1].split()[1].endswith('a2_b0.05.sh') and len(submitted()) == 6   # the lost one, again
    _finish_run(workdir, 'round01/a2_b0.05', [7.0, 6.5])
    result = cli_runner().invoke(main, cli[:-1])          # waits (polls) until everything is read back
    assert result.exit_code == 0, result.output
    m = read_manifest(workdir)
    assert m['status'] == 'done'
    runs = {r['name']: r for r in m['rounds'][0]['runs']}
    assert runs['a3_b0.05']['status'] == 'failed' and 'exit status 1' in runs['a3_b0.05']['error']
    assert runs['a1_b0.05']['best']['step'] == 1 and runs['a1_b0.05']['best']['score'] == 7.0
    chosen = m['rounds'][0]['chosen']
    assert (chosen['run'], chosen['step'], chosen['score']) == ('a2_b0.05', 2, 6.5)
    snapshot = workdir / chosen['snapshot']
    assert chosen['sha256'] == hashlib.sha256(snapshot.read_bytes()).hexdigest()
    assert m['rounds'][0]['reference_score'] == 9.0 and m['rounds'][0]['improvement'] == pytest.approx(2.5)
    assert m['rounds'][0]['reference_evaluation']['source'] == 'evaluated' and m['rounds'][0]['stalled'] is False
    assert m['rounds'][0]['reference_samples']['seeds'] == '1000000-1049999'   # round 1's own seeds, none of 0-49999


def test_a_work_directory_refuses_a_changed_config_but_not_more_rounds(files, tmp_path, monkeypatch):
    install_fake_slurm(tmp_path, monkeypatch)
    slurm = dict(launcher__kind='slurm', launcher__template=SLURM_TEMPLATE)
    workdir = str(tmp_path / 'work')
    assert cli_runner().invoke(main, ['rounds', 'run', edm2_config(files, **slurm), '--workdir', workdir, '--no-wait']).exit_code == 0
    more = cli_runner().invoke(main, ['rounds', 'run', edm2_config(files, rounds=5, **slurm), '--workdir', workdir, '--no-wait'])
    assert more.exit_code == 0 and read_manifest(workdir)['config']['rounds'] == 5
    changed = cli_runner().invoke(main, ['rounds', 'run', edm2_config(files, rounds=5, sweep__beta=[0.1], train__lr=1e-3, **slurm),
                                         '--workdir', workdir, '--no-wait'])
    assert changed.exit_code == 2
    assert changed.stderr.strip() == (f'error: {workdir} was started with a different configuration (betas, train changed); '
                                      'restore it or use a new --workdir (only rounds, stop, launcher may change)')


def test_example_refuses_an_existing_directory(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'edm2_ext.example', str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == f'error: {tmp_path} exists; give a new directory for the example'


def test_local_launcher_uses_torchrun_for_several_processes():
    from ddo_patch.rounds.launch import Command, command_line
    command = Command('edm2_ext.train', ['--outdir', 'round01/a1_b0.1'])
    local = dict(kind='local', nodes=1, env={})
    python = sys.executable
    assert command_line(dict(local, nproc_per_node=1), command) == f'{python} -m edm2_ext.train --outdir round01/a1_b0.1'
    assert command_line(dict(local, nproc_per_node=2), command) == (
        f'{python} -m torch.distributed.run --standalone --nproc_per_node=2 -m edm2_ext.train --outdir round01/a1_b0.1')


def test_a_rerun_stops_only_the_killed_managers_leftover_job(tmp_path, capsys):
    """What a rerun does first after the manager was SIGKILLed mid-job (the kill-and-resume test in
    test_rounds_edm2 exercises it too, but whether the orphan is still alive there depends on timing)."""
    record = tmp_path / rounds_launch.RUNNING
    stranger = subprocess.Popen(['sleep', '600'], start_new_session=True)   # not started by this work directory
    manifest.write_json(record, dict(job='round01-a1_b0.1', pgid=stranger.pid, log='x.log'))
    rounds_launch.stop_leftovers(tmp_path)
    assert stranger.poll() is None and not record.exists()
    stranger.kill()
    stranger.wait()

    env = dict(os.environ, **{rounds_launch.OWNER_ENV: str(tmp_path)})
    job = subprocess.Popen(['bash', '-c', 'sleep 600 & sleep 600; wait'], env=env, start_new_session=True)
    while len(psutil.Process(job.pid).children()) < 2:
        time.sleep(0.01)
    pids = [job.pid] + [child.pid for child in psutil.Process(job.pid).children()]
    manifest.write_json(record, dict(job='round01-a1_b0.1', pgid=job.pid, log='x.log'))
    rounds_launch.stop_leftovers(tmp_path)   # kills the group and reaps it
    assert not any(_alive(pid) for pid in pids) and not record.exists()
    assert 'stopping 3 leftover process(es) of the interrupted job round01-a1_b0.1' in capsys.readouterr().out


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE   # killed, not yet reaped by init: gone
    except psutil.NoSuchProcess:
        return False


def scripted_config(tmp_path, law, **top):
    """A local-launcher config on tests/scripted_backend.py: a pretrained "snapshot" of score 10, two sweep points."""
    (tmp_path / 'pretrained.json').write_text('{"score": 10.0}')
    tests = os.path.dirname(os.path.abspath(__file__))
    return write_config(tmp_path / 'scripted.toml', dict(backend='scripted_backend.ScriptedBackend', pretrained='pretrained.json', **top),
                        dict(run=dict(duration=4, eval_every=2), sweep=dict(alpha=[1, 2], beta=[0.1]), train=dict(law=law),
                             evaluate=dict(metric='score'), launcher=dict(kind='local', env={'PYTHONPATH': tests})))


def test_a_run_in_which_nothing_improves_stops_after_patience_rounds(tmp_path):
    """Every sweep point is worse than its reference: each round keeps it (its score is shared, not re-measured),
    counts as stalled, and the manager stops after stop.patience rounds instead of running all of them."""
    config = scripted_config(tmp_path, 'never', rounds=6)
    with open(config, 'a') as f:
        f.write('[stop]\nmin_improvement = 0.0\npatience = 2\n')
    workdir = tmp_path / 'work'
    result = cli_runner().invoke(main, ['rounds', 'run', config, '--workdir', str(workdir)])
    assert result.exit_code == 0, result.output + result.stderr
    m = read_manifest(workdir)
    assert m['status'] == 'stopped' and 'no improvement above 0 for 2 round(s) in a row' in m['stop_reason']
    assert len(m['rounds']) == 2
    for r in m['rounds']:
        assert r['chosen']['run'] == 'reference' and r['chosen']['score'] == 10.0 and r['stalled'] is True
        assert r['reference']['path'] == str(tmp_path / 'pretrained.json')
        assert [e['step'] for run in r['runs'] for e in run['evaluations']] == [2, 4, 2, 4]   # no step-0 evaluation
    assert m['rounds'][0]['reference_evaluation']['source'] == 'evaluated'
    assert m['rounds'][1]['reference_evaluation'] == dict(score=10.0, source='round 1')   # evaluated once, shared
    assert not (workdir / 'round02' / 'reference-evaluation.json').exists()


def test_the_best_sweep_point_is_promoted_when_it_beats_the_reference(tmp_path):
    workdir = tmp_path / 'work'
    result = cli_runner().invoke(main, ['rounds', 'run', scripted_config(tmp_path, 'alpha_helps', rounds=2), '--workdir', str(workdir)])
    assert result.exit_code == 0, result.output + result.stderr
    first, second = read_manifest(workdir)['rounds']
    assert (first['chosen']['run'], first['chosen']['step'], first['chosen']['score']) == ('a2_b0.1', 4, pytest.approx(9.2))
    assert second['reference']['path'] == first['chosen']['snapshot'] and second['reference']['promoted_from'] == 'a2_b0.1'
    assert second['reference_score'] == first['chosen']['score'] and second['chosen']['score'] == pytest.approx(8.4)
    assert first['improvement'] == pytest.approx(0.8) and not first['stalled']


def control_config(tmp_path, start):
    """`scripted_config` with the matched control and report and noise seeds (the scripted evaluation adds NOISE on
    the noise seeds)."""
    config = scripted_config(tmp_path, 'alpha_helps', rounds=2)
    with open(config, 'a') as f:
        f.write(f'[control]\nobjective = "mle"\nstart = "{start}"\n')
    text = open(config).read().replace('[evaluate]\n', '[evaluate]\nreport_seeds = "report"\nnoise_seeds = "noise"\n')
    open(config, 'w').write(text)
    return config


def test_the_matched_control_runs_every_round_from_the_reference_and_is_never_promoted(tmp_path):
    """[control]: one more run per round, the backend's job with objective 'mle' from the round's reference, the same
    duration and evaluations; its choice is scored on the report seeds beside DDO's, the pretrained model once more on
    the noise seeds (round 1 only); DDO's choice, not the control's, is promoted; its images count at MLE cost."""
    from scripted_backend import NOISE
    workdir = tmp_path / 'work'
    result = cli_runner().invoke(main, ['rounds', 'run', control_config(tmp_path, 'reference'), '--workdir', str(workdir)])
    assert result.exit_code == 0, result.output + result.stderr
    first, second = read_manifest(workdir)['rounds']
    for r, start in ((first, 10.0), (second, 9.2)):
        control = r['control']
        assert control['objective'] == 'mle' and control['status'] == 'done' and control['alpha'] is None
        assert control['start'] == dict(path=r['reference']['path'], score=pytest.approx(start), source=f'round {r["round"]} reference')
        assert [e['step'] for e in control['evaluations']] == [2, 4]
        assert control['chosen']['run'] == 'control' and control['chosen']['score'] == pytest.approx(start - 0.2)
        assert r['report']['control']['score'] == pytest.approx(start - 0.2)
        assert r['cost']['train_images'] == 3 * 4 and r['cost']['mle_equivalents'] == pytest.approx(2 * 4 * 2.5 + 4 + 10 * 6 + 10 * len(
            [e for e in [r['reference_evaluation'], *r['report'].values()] if e.get('source') == 'evaluated']))
    assert second['reference']['path'] == first['chosen']['snapshot'] != first['control']['chosen']['snapshot']
    assert first['report']['reference_noise']['score'] == pytest.approx(10.0 + NOISE) and 'reference_noise' not in second['report']
    assert 'round 1 control (mle, from round 1 reference): done, chose control step 4' in result.output
    report = cli_runner().invoke(main, ['rounds', 'report', str(workdir)]).output
    assert '| 1 | 9.2 (a2_b0.1) | 9.8 (control) | -0.6 | 9.2 | 9.8 | -0.6 |' in report
    assert '| 2 | 8.4 (a2_b0.1) | 9 (control) | -0.6 | 8.4 | 9 | -0.6 |' in report
    assert 'scores 10 on the report seeds and 10.01 on as many other seeds' in report
    status = cli_runner().invoke(main, ['rounds', 'status', str(workdir)]).output
    assert 'control (mle, from round 2 reference): chose control step 4: 9; report seeds 9' in status


def test_a_control_chain_starts_each_round_from_the_previous_controls_choice(tmp_path):
    """start = "control": round 2's control trains from round 1's control choice (the chain of MLE finetunes matched
    to the chain of DDO rounds), whose report score is not computed again."""
    workdir = tmp_path / 'work'
    result = cli_runner().invoke(main, ['rounds', 'run', control_config(tmp_path, 'control'), '--workdir', str(workdir)])
    assert result.exit_code == 0, result.output + result.stderr
    first, second = read_manifest(workdir)['rounds']
    assert second['control']['start'] == dict(path=first['control']['chosen']['snapshot'], score=pytest.approx(9.8),
                                              source='round 1 control')
    assert second['control']['chosen']['score'] == pytest.approx(9.6) and second['report']['control']['score'] == pytest.approx(9.6)
    assert not (workdir / 'round02' / 'report-reference.json').exists()   # round 1 scored round 2's reference


def test_halving_stops_exactly_the_worse_points_at_each_rung(tmp_path):
    workdir = tmp_path / 'work'
    result = cli_runner().invoke(main, ['rounds', 'run', halving_config(tmp_path), '--workdir', str(workdir)])
    assert result.exit_code == 0, result.output + result.stderr
    r = read_manifest(workdir)['rounds'][0]
    check_halving_round(workdir, r)
    assert 'round 1 rung 2: kept a3_b0.1, a4_b0.1; stopped a1_b0.1, a2_b0.1' in result.output
    report = cli_runner().invoke(main, ['rounds', 'report', str(workdir)]).output
    assert '| 9.8 (stopped at 2) | 9.6 (stopped at 2) | 8.8 (stopped at 4) | 6.8 |' in report


def test_racing_needs_a_backend_that_races(tmp_path):
    config = write_config(tmp_path / 'var.toml', dict(backend='var_ext.rounds_backend.RoundsBackend', rounds=1, pretrained='x.pth'),
                          dict(run=dict(duration=8, eval_every=4), sweep=dict(alpha=[1], beta=[0.1]),
                               evaluate=dict(metric='m:f', policy='racing', race_samples=[100])))
    (tmp_path / 'x.pth').write_bytes(b'x')
    result = cli_runner().invoke(main, ['rounds', 'run', config, '--workdir', str(tmp_path / 'work')])
    assert result.exit_code == 2 and 'evaluate.policy = "racing" needs a backend that scores race levels; var does not' in result.stderr


def test_random_subset_draws_count_points_per_round_from_the_grid(tmp_path):
    """Two of the four points per round, drawn with the round's own seed, each run to the end."""
    config = halving_config(tmp_path, rounds=2)
    text = open(config).read().replace('policy = "halving"', 'policy = "random"\ncount = 2\nseed = 7')
    text = text.replace('rungs = [2, 4]\n', '').replace('keep = 0.5\n', '')
    open(config, 'w').write(text)
    workdir = tmp_path / 'work'
    result = cli_runner().invoke(main, ['rounds', 'run', config, '--workdir', str(workdir)])
    assert result.exit_code == 0, result.output + result.stderr
    first, second = read_manifest(workdir)['rounds']
    assert len(first['points']) == len(second['points']) == 2 and first['points'] != second['points']
    assert all(run['status'] == 'done' and run['images'] == 8 for r in (first, second) for run in r['runs'])
    again = rounds_config.load(config)
    assert [list(p) for p in sweep.round_points(again, None, 1)] == first['points']   # the draw is the config's


RACING = dict(policy='racing', race_samples=[5, 8], race_threshold=0.05, race_groups=5)


def test_halving_with_racing_makes_the_same_decisions_for_fewer_samples(tmp_path):
    """The scripted race (scores + 1/n, jackknife standard error 0.2/sqrt(n) per snapshot): at rung 2, a1 and a2
    stop after 5 of the 10 samples (0.6 and 0.4 behind a4), a3 (0.2 behind) races on and halving keeps two points;
    at rung 4 a3's new snapshot stops at 5 samples; in the last stage a4's step 6 does. The rung decisions and the
    choice are those of full evaluation, for 60 samples instead of 80."""
    workdir = tmp_path / 'work'
    result = cli_runner().invoke(main, ['rounds', 'run', halving_config(tmp_path, evaluate=RACING), '--workdir', str(workdir)])
    assert result.exit_code == 0, result.output + result.stderr
    r = read_manifest(workdir)['rounds'][0]
    assert [(d['step'], d['kept'], d['stopped']) for d in r['rungs']] == [
        (2, ['a3_b0.1', 'a4_b0.1'], ['a1_b0.1', 'a2_b0.1']), (4, ['a4_b0.1'], ['a3_b0.1'])]
    samples = {(run['name'], e['step']): (e['samples'], e['status']) for run in r['runs'] for e in run['evaluations']}
    assert samples == {('a1_b0.1', 2): (5, 'stopped'), ('a2_b0.1', 2): (5, 'stopped'), ('a3_b0.1', 2): (10, 'final'),
                       ('a3_b0.1', 4): (5, 'stopped'), ('a4_b0.1', 2): (10, 'final'), ('a4_b0.1', 4): (10, 'final'),
                       ('a4_b0.1', 6): (5, 'stopped'), ('a4_b0.1', 8): (10, 'final')}
    stopped = next(e for e in r['runs'][0]['evaluations'])
    assert stopped['reason'].startswith('P(beats round01/a4_b0.1/snapshot-2.json) = 0.0')
    assert (r['chosen']['run'], r['chosen']['step'], r['chosen']['score']) == ('a4_b0.1', 8, pytest.approx(10 - 0.4 * 8 + 0.1))
    assert [(level['stage'], level['samples'], level['racing'], len(level['stopped'])) for level in r['race']['levels']] == [
        (2, 5, 4, 2), (2, 8, 2, 0), (2, 10, 2, 0), (4, 5, 2, 1), (4, 8, 1, 0), (4, 10, 1, 0), (8, 5, 2, 1), (8, 8, 1, 0), (8, 10, 1, 0)]
    assert all('evaluate' not in command for run in r['runs'] for command in run['commands'])   # the jobs only train
    assert r['cost'] == dict(train_images=16, evaluation_samples=60 + 10, reference_samples=0,
                             mle_equivalents=pytest.approx(16 * 2.5 + 70),
                             stages={'reference': 10, 'rung 2': 20 + 30, 'rung 4': 10 + 15, 'end': 10 + 15, 'report': 0})
    # the training jobs and the three race levels of each stage
    assert [(t['stage'], t['jobs']) for t in r['times']] == [('reference', 1), ('rung 2', 4 + 3), ('rung 4', 2 + 3), ('end', 1 + 3)]
    report = cli_runner().invoke(main, ['rounds', 'report', str(workdir)]).output
    assert '- round 1: 8 snapshots, 60 samples against 80 in full (75%); 4 scored in full' in report
    assert '  - round01/a1_b0.1/snapshot-2.json: stopped at 5 samples, P(beats round01/a4_b0.1/snapshot-2.json) = 0.0' in report
    assert '| 1 | rung 2 | 50 | 45% | 7 |' in report and '| 1 | all | 110 | 100% | 17 |' in report
    assert '| raced out | raced out | 9.5 (stopped at 4) | 6.9 |' in report
    # A rerun finds every level decided and changes nothing.
    again = cli_runner().invoke(main, ['rounds', 'run', halving_config(tmp_path, evaluate=RACING), '--workdir', str(workdir)])
    assert again.exit_code == 0 and comparable(read_manifest(workdir)) == comparable(dict(read_manifest(workdir), rounds=[r]))


def test_halving_on_slurm_submits_nothing_more_for_a_stopped_point(tmp_path, monkeypatch):
    """On SLURM every stage's jobs are submitted together; a point stopped at a rung is never submitted again."""
    state = install_fake_slurm(tmp_path, monkeypatch, run_jobs=True)
    tests = os.path.dirname(os.path.abspath(__file__))
    config = halving_config(tmp_path, launcher=dict(kind='slurm', template=SLURM_TEMPLATE, poll_seconds=0.01,
                                                    env={'PYTHONPATH': tests}))
    workdir = tmp_path / 'work'
    result = cli_runner().invoke(main, ['rounds', 'run', config, '--workdir', str(workdir)])
    assert result.exit_code == 0, result.output + result.stderr
    check_halving_round(workdir, read_manifest(workdir)['rounds'][0])
    scripts = [os.path.relpath(line.split()[1], workdir) for line in (state / 'submitted').read_text().splitlines()]
    assert scripts == ['round01/reference-evaluation.sh'] + [f'round01/a{a}_b0.1.to2.sh' for a in (1, 2, 3, 4)] + \
        ['round01/a3_b0.1.to4.sh', 'round01/a4_b0.1.to4.sh', 'round01/a4_b0.1.sh']


def test_racing_on_slurm_makes_the_local_decisions_with_each_level_a_job(tmp_path, monkeypatch):
    state = install_fake_slurm(tmp_path, monkeypatch, run_jobs=True)
    tests = os.path.dirname(os.path.abspath(__file__))
    launcher = dict(kind='slurm', template=SLURM_TEMPLATE, poll_seconds=0.01, env={'PYTHONPATH': tests})
    slurm, local = tmp_path / 'slurm', tmp_path / 'local'
    for workdir, where in ((slurm, launcher), (local, None)):   # (one config file: written just before its run)
        config = halving_config(tmp_path, launcher=where, evaluate=RACING)
        result = cli_runner().invoke(main, ['rounds', 'run', config, '--workdir', str(workdir)])
        assert result.exit_code == 0, result.output + result.stderr
    same = ('commands', 'command', 'config')   # what differs: the launch prefix, the launcher
    assert comparable(read_manifest(slurm), ignore=same) == comparable(read_manifest(local), ignore=same)
    scripts = [os.path.relpath(line.split()[1], slurm) for line in (state / 'submitted').read_text().splitlines()]
    assert [s for s in scripts if '/race/' in s] == [f'round01/race/race-{stage}-n{n}.sh' for stage in (2, 4, 8) for n in (5, 8, 10)]


def _kill_while_running(tmp_path, config, job):
    """Run `config` whole in tmp_path/whole, then in tmp_path/killed with the manager SIGKILLed while the job at `job`
    (its path in the work directory) runs; (the killed work directory, a function that reruns it to its end)."""
    args = [sys.executable, '-m', 'ddo_patch.cli', 'rounds', 'run', config, '--workdir']
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)),
                                                                    os.environ.get('PYTHONPATH')])))
    subprocess.run(args + [str(tmp_path / 'whole')], env=env, check=True, capture_output=True, timeout=300)
    killed = tmp_path / 'killed'
    proc = subprocess.Popen(args + [str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    script, status = killed / f'{job}.sh', killed / f'{job}.status'
    deadline = time.time() + 120
    while not (script.exists() and not status.exists()) and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    return killed, lambda: subprocess.run(args + [str(killed)], env=env, check=True, capture_output=True, timeout=300)


def test_a_kill_during_a_rung_resumes_to_the_same_decisions(tmp_path):
    killed, resume = _kill_while_running(tmp_path, halving_config(tmp_path, seconds=0.3), 'round01/a3_b0.1.to4')   # second rung
    assert read_manifest(killed)['rounds'][0]['rungs'][0]['step'] == 2 and len(read_manifest(killed)['rounds'][0]['rungs']) == 1
    resume()
    assert comparable(read_manifest(killed)) == comparable(read_manifest(tmp_path / 'whole'))


def test_a_kill_during_a_race_level_resumes_to_the_same_decisions(tmp_path):
    killed, resume = _kill_while_running(tmp_path, halving_config(tmp_path, evaluate=RACING), 'round01/race/race-4-n8')
    levels = [(lv['stage'], lv['samples']) for lv in read_manifest(killed)['rounds'][0]['race']['levels']]
    assert levels == [(2, 5), (2, 8), (2, 10), (4, 5)]   # killed in the second rung's second level
    resume()
    assert comparable(read_manifest(killed)) == comparable(read_manifest(tmp_path / 'whole'))


def test_carry_over_sweeps_the_neighbours_of_the_last_choice(tmp_path):
    workdir = tmp_path / 'work'
    result = cli_runner().invoke(main, ['rounds', 'run', halving_config(tmp_path, rounds=2, carry=True), '--workdir', str(workdir)])
    assert result.exit_code == 0, result.output + result.stderr
    first, second = read_manifest(workdir)['rounds']
    assert len(first['points']) == 8 and first['chosen']['run'] == 'a4_b0.1'
    assert second['points'] == [[3, 0.1], [3, 0.2], [4, 0.1], [4, 0.2]]   # alpha 3-4 (4 is the last), beta 0.1-0.2
