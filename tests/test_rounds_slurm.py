"""The round manager's SLURM launcher against a real one-node Slurm cluster (tests/slurm/start.sh starts munged,
slurmctld and slurmd for this module and stops them after it; skipped, with the reason, where Slurm is not
installed: `apt-get install -y slurm-wlm munge`). On the tiny EDM2 world: a round on SLURM ends with the local
launcher's manifest although one point is requeued mid-training (it resumes from its checkpoint, and the
manifest counts the interruption); preemption by signal: a point warned mid-interval requeues itself, one whose
steps get SIGTERM is submitted again, a point at its time limit requeues itself, each training every step exactly
once, and a warned VAR point ends with the uninterrupted run's weights; two processes per job under srun + torch.distributed.run (gloo). On the
scripted backend (fast): a cancelled and a failing job are recorded failed with their logs while the round
goes on; a cron-style manager (`--no-wait`) finishes the round over several calls, after Slurm has forgotten
the jobs; halving submits nothing more for a stopped point. Time: 5 min in all on 2 CPU cores shared with other
jobs (load ~6; 2.6 min of it the requeue test, 1 min the two-process one, 1 min the scripted ones)."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from rounds_helpers import (
    REPO,
    check_halving_round,
    comparable,
    halving_config,
    manager,
    read_manifest,
    run_manager,
    variant,
    write_config,
)

pytestmark = pytest.mark.slurm

START = os.path.join(REPO, 'tests', 'slurm', 'start.sh')
TESTS = os.path.dirname(os.path.abspath(__file__))   # where scripted_backend is
# No --output, --open-mode, --requeue or --nodes here: the launcher passes those to sbatch itself.
TEMPLATE = '''#!/bin/bash
#SBATCH --job-name=ddo-{{job_name}}
#SBATCH --ntasks-per-node=1
#SBATCH --time=10
{{commands}}
'''
# What differs between the same work on two launchers: the config file and its launcher, the command lines (srun ...).
LAUNCHER_KEYS = ('source', 'launcher', 'commands', 'command')


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    path = os.pathsep.join([os.environ.get('PATH', ''), '/usr/sbin', '/sbin'])
    missing = [tool for tool in ('munged', 'slurmctld', 'slurmd', 'sbatch') if shutil.which(tool, path=path) is None]
    if missing:
        pytest.skip(f'Slurm is not installed ({", ".join(missing)} not found): apt-get install -y slurm-wlm munge')
    state = tmp_path_factory.mktemp('slurm')
    with open(state / 'start.log', 'w') as log:
        proc = subprocess.Popen(['bash', START, str(state)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (state / 'ready').exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.terminate()
            proc.wait(timeout=60)
            pytest.fail(f'tests/slurm/start.sh did not bring the node up:\n{(state / "start.log").read_text()[-3000:]}')
        time.sleep(0.2)
    yield dict(os.environ, SLURM_CONF=str(state / 'slurm.conf'))
    proc.terminate()   # it cancels what is left and stops the daemons
    proc.wait(timeout=60)


def slurm(env, *args):
    return subprocess.run(args, env=env, capture_output=True, text=True, check=True, timeout=60).stdout


def state_of(env, job_id):
    """The job's state, '' once Slurm has forgotten it (MinJobAge after its end)."""
    proc = subprocess.run(['squeue', '-h', '-t', 'all', '-j', job_id, '-o', '%T'], env=env, capture_output=True, text=True,
                          check=False, timeout=60)
    return proc.stdout.strip()


def job_id(workdir, job):
    with open(workdir / 'round01' / f'{job}.job') as f:
        return json.load(f)['job_id']


def wait_for(condition, what, timeout=180):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f'timed out waiting for {what}'
        time.sleep(0.1)


def on_slurm(**launcher):
    """[launcher] replacements that move the tiny EDM2 config to the test cluster."""
    return {'kind = "local"': f'kind = "slurm"\npoll_seconds = 0.5\ntemplate = {json.dumps(TEMPLATE)}', **launcher}


# The tiny config, one round, no report (or noise) seeds; 2Ki images per point with a checkpoint at 1Ki, to requeue after.
# Its matched control stays: on SLURM it is submitted with the sweep points.
ONE_ROUND = {'rounds = 2': 'rounds = 1', 'duration = "1Ki"': 'duration = "2Ki"', 'eval_every = "1Ki"': 'eval_every = "2Ki"',
             'report_seeds = "32-63"': '', 'noise_seeds = "64-95"': '', 'count = 64': 'count = 32'}
NO_CONTROL = {'objective = "mle"': ''}


@pytest.fixture(scope='module')
def local_round(world):
    """The one-round config on the local launcher: what a round on SLURM must reproduce, however interrupted."""
    local = world['root'] / 'slurm-local'
    run_manager(world, variant(world, 'slurm-local.toml', **ONE_ROUND), local)
    return read_manifest(local)


def test_a_round_on_slurm_matches_the_local_one_and_a_requeued_point_resumes(world, cluster, local_round):
    workdir, log = world['root'] / 'slurm-requeue', world['root'] / 'slurm-requeue.log'
    args = manager(world, variant(world, 'slurm-requeue.toml', **ONE_ROUND, **on_slurm()), workdir)
    env = dict(world['env'], SLURM_CONF=cluster['SLURM_CONF'])
    with open(log, 'w') as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    run = workdir / 'round01' / 'a1_b0.05'

    def past_the_checkpoint():   # training goes on after writing training-state-0000001.pt (so it is complete)
        assert not (run / 'training-state-0000002.pt').exists(), 'a1 finished before it could be requeued'
        if not (run / 'training-state-0000001.pt').exists():
            return False
        return any(json.loads(line)['Progress/kimg'] > 1.1 for line in (run / 'stats.jsonl').read_text().splitlines())
    wait_for(past_the_checkpoint, 'a1 to train past its checkpoint')
    point = job_id(workdir, 'a1_b0.05')
    slurm(env, 'scontrol', 'requeue', point)
    wait_for(lambda: state_of(env, point) == 'PENDING', 'the requeued job to be pending')
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]

    m, expected = read_manifest(workdir), local_round
    assert m['status'] == 'done' and comparable(m, LAUNCHER_KEYS) == comparable(expected, LAUNCHER_KEYS)
    assert m['rounds'][0]['chosen']['run'] == expected['rounds'][0]['chosen']['run'] == 'a1_b0.05'
    runs = {r['name']: r for r in m['rounds'][0]['runs']}
    assert (runs['a1_b0.05']['interruptions'], runs['a4_b0.05']['interruptions']) == (1, 0)
    control = m['rounds'][0]['control']
    assert control['status'] == 'done' and control['commands'][0].startswith('srun --ntasks-per-node=1 ')
    assert '-m edm2_ext.train' in control['commands'][0] and '--objective mle' in control['commands'][0]
    assert all(c.startswith('srun --ntasks-per-node=1 ') for c in runs['a1_b0.05']['commands'])
    # Requeued (the same job, its log appended to), not submitted again, and resumed at the checkpoint's 1 kimg.
    assert job_id(workdir, 'a1_b0.05') == point and log.read_text().count('submitted round01-a1_b0.05 ') == 1
    assert [line.split()[1:] for line in (workdir / 'round01' / 'a1_b0.05.starts').read_text().splitlines()] == [
        ['job', point, 'restart', '0'], ['job', point, 'restart', '1']]
    point_log = (workdir / 'round01' / 'a1_b0.05.log').read_text()
    assert point_log.index('Training from 0 kimg to 2 kimg') < point_log.index(f'JOB {point} ON') < \
        point_log.index('Training from 1 kimg to 2 kimg')
    assert 'DUE TO JOB REQUEUE' in point_log


def test_a_warned_and_a_terminated_point_resume_without_losing_a_step(world, cluster, local_round):
    """Mid-interval, a1 gets Slurm's warning (`--signal=B:USR1@lead`; here sent by hand to its batch shell) and a4 a
    SIGTERM to its steps alone. a1's job passes the warning on to the training process, which finishes its step,
    writes its state and exits 75, and requeues itself; a4's process does the same, its job writes status 75, and the
    manager submits it again. Both resume where they stopped: every 32-image step is trained exactly once (stats.jsonl
    has a row per step), each counts one interruption, and the round ends with the local launcher's manifest."""
    workdir, log = world['root'] / 'slurm-signalled', world['root'] / 'slurm-signalled.log'
    args = manager(world, variant(world, 'slurm-signalled.toml', **ONE_ROUND, **on_slurm()), workdir)
    env = dict(world['env'], SLURM_CONF=cluster['SLURM_CONF'])
    with open(log, 'w') as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)

    def stats(name):
        path = workdir / 'round01' / name / 'stats.jsonl'
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def trained(name, kimg):
        return any(row['Progress/kimg'] >= kimg for row in stats(name))
    wait_for(lambda: trained('a1_b0.05', 0.2) and trained('a4_b0.05', 0.2), 'both points to train a few steps')
    assert not trained('a1_b0.05', 1.0) and not trained('a4_b0.05', 1.0), 'a point reached its checkpoint before the signal'
    warned, terminated = job_id(workdir, 'a1_b0.05'), job_id(workdir, 'a4_b0.05')
    slurm(env, 'scancel', '--signal=USR1', '--batch', warned)
    slurm(env, 'scancel', '--signal=TERM', terminated)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]

    m = read_manifest(workdir)
    assert m['status'] == 'done' and comparable(m, LAUNCHER_KEYS) == comparable(local_round, LAUNCHER_KEYS)
    runs = {r['name']: r for r in m['rounds'][0]['runs']}
    assert runs['a1_b0.05']['interruptions'] == runs['a4_b0.05']['interruptions'] == 1
    assert job_id(workdir, 'a1_b0.05') == warned and job_id(workdir, 'a4_b0.05') != terminated   # requeued; submitted again
    assert 'a4_b0.05 was interrupted and wrote its state (exit status 75); submitting it again' in log.read_text()
    for name in ('a1_b0.05', 'a4_b0.05'):
        assert 'SIGTERM received: the step in progress is done' in (workdir / 'round01' / f'{name}.log').read_text()
        steps = [round(row['Progress/kimg'] * 1000) for row in stats(name) if 'Loss/loss' in row]
        assert steps == list(range(32, 2049, 32))   # no step lost, none repeated


def test_a_job_at_its_time_limit_checkpoints_and_requeues_itself_before_it(world, cluster):
    """A two-minute --time with signal_lead = 40 for a point that trains for longer: Slurm warns the job 40-70 s
    before its limit (its timer runs every ~30 s), the point checkpoints and requeues itself; it is never killed by
    the limit (not submitted again), and every step is trained once. (EDM2's point: its step-boundary hooks are the
    subtler of the two adapters'; the job script is the same for VAR, warned on the cluster by hand below.)"""
    limited = TEMPLATE.replace('#SBATCH --time=10', '#SBATCH --time=2')
    workdir, log = world['root'] / 'slurm-limit', world['root'] / 'slurm-limit.log'
    config = variant(world, 'slurm-limit.toml', **{**ONE_ROUND, 'duration = "1Ki"': 'duration = "32Ki"', 'eval_every = "1Ki"': 'eval_every = "32Ki"'},
                     **NO_CONTROL, **{'alpha = [1, 4]': 'alpha = [1]'},
                     **{'kind = "local"': f'kind = "slurm"\npoll_seconds = 0.5\nsignal_lead = 40\ntemplate = {json.dumps(limited)}'})
    env = dict(world['env'], SLURM_CONF=cluster['SLURM_CONF'])
    with open(log, 'w') as out:
        assert subprocess.run(manager(world, config, workdir), env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode == 0
    point = read_manifest(workdir)['rounds'][0]['runs'][0]
    assert point['status'] == 'done' and point['interruptions'] >= 1 and 'submitting it again' not in log.read_text()
    starts = (workdir / 'round01' / 'a1_b0.05.starts').read_text().splitlines()
    assert len({line.split()[2] for line in starts}) == 1 and len(starts) == point['interruptions'] + 1   # one job, requeued
    steps = [round(json.loads(line)['Progress/kimg'] * 1000) for line in
             (workdir / 'round01' / 'a1_b0.05' / 'stats.jsonl').read_text().splitlines() if 'Loss/loss' in line]
    assert steps == list(range(32, 32 * 1024 + 1, 32))


def var_world(var_root, cluster, tmp_path):
    """The tiny VQVAE + VAR of var_tiny, and the environment of a manager that runs var_ext.train on the cluster."""
    from var_tiny import tiny_checkpoints
    vae, ckpt = tiny_checkpoints(str(tmp_path))
    env = dict(os.environ, SLURM_CONF=cluster['SLURM_CONF'], VAR_ROOT=str(var_root),
               PYTHONPATH=os.pathsep.join(filter(None, [TESTS, os.environ.get('PYTHONPATH')])))
    return dict(root=tmp_path, vae=vae, ckpt=ckpt, env=env)


def var_config(world, name, iterations, **launcher):
    """One round, one point of `iterations` iterations of 8 tokenised samples, evaluated at its end."""
    return write_config(world['root'] / f'{name}.toml', dict(backend='var_ext.rounds_backend.RoundsBackend', rounds=1,
                                                              pretrained=world['ckpt']), dict(
        run=dict(duration=iterations, eval_every=iterations), sweep=dict(alpha=[10], beta=[0.02]),
        train=dict(depth=2, vae=world['vae'], patch_nums='1_2_3_4', num_classes=10, vae_vocab=64, vae_ch=32, vae_z=8,
                   dataset='var_tiny:token_dataset', workers=0, global_batch=8, lr=1e-3),
        evaluate=dict(metric='var_tiny:brightness', samples=10, cfg=[0], select_cfg=0),
        launcher=dict(env={'OMP_NUM_THREADS': '1'}, **launcher)))


def rounds_command(config, workdir):
    return [sys.executable, '-m', 'ddo_patch.cli', 'rounds', 'run', str(config), '--workdir', str(workdir)]


def test_a_var_point_warned_mid_run_requeues_and_ends_with_the_uninterrupted_weights(var_root, cluster, tmp_path):
    """The same for var_ext.train: warned after a few of its 160 iterations, the job requeues itself; every iteration
    is trained once and the last checkpoint equals an uninterrupted local run's."""
    import torch
    var = var_world(var_root, cluster, tmp_path)
    local = tmp_path / 'local'
    subprocess.run(rounds_command(var_config(var, 'local', 160, kind='local'), local), env=var['env'], check=True,
                   capture_output=True, timeout=600)
    workdir = tmp_path / 'warned'
    with open(tmp_path / 'warned.log', 'w') as out:
        proc = subprocess.Popen(rounds_command(var_config(var, 'warned', 160, kind='slurm', poll_seconds=0.5, template=TEMPLATE),
                                               workdir), env=var['env'], stdout=out, stderr=subprocess.STDOUT)
    log = workdir / 'round01' / 'a10_b0.02' / 'log.jsonl'
    wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 10, 'ten iterations')
    slurm(var['env'], 'scancel', '--signal=USR1', '--batch', job_id(workdir, 'a10_b0.02'))
    assert proc.wait(timeout=300) == 0, (tmp_path / 'warned.log').read_text()[-3000:]
    point = read_manifest(workdir)['rounds'][0]['runs'][0]
    assert point['status'] == 'done' and point['interruptions'] == 1
    assert [json.loads(line)['iteration'] for line in log.read_text().splitlines()] == list(range(1, 161))
    ours, theirs = (torch.load(d / 'round01' / 'a10_b0.02' / 'var-ddo-last.pth') for d in (workdir, local))
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-5)


def test_two_processes_per_job_under_srun_train_as_one_run(world, cluster):
    config = variant(world, 'slurm-2proc.toml', **{'rounds = 2': 'rounds = 1', 'alpha = [1, 4]': 'alpha = [1]',
                                                   'report_seeds = "32-63"': '', 'noise_seeds = "64-95"': '',
                                                   'objective = "mle"': '', 'count = 64': 'count = 32'},
                     **on_slurm(**{'nproc_per_node = 1': 'nproc_per_node = 2'}))
    workdir = world['root'] / 'slurm-2proc'
    run_manager(dict(world, env=dict(world['env'], SLURM_CONF=cluster['SLURM_CONF'])), config, workdir)
    run = read_manifest(workdir)['rounds'][0]['runs'][0]
    assert run['status'] == 'done' and run['best']['score'] > 0
    assert '--nnodes=1 --nproc_per_node=2 --rdzv_backend=c10d' in run['commands'][0]
    log = (workdir / 'round01' / 'a1_b0.05.log').read_text()
    # One run of two ranks (rank 0 prints its options once), not two runs of one rank each.
    assert log.count('"world_size": 2') == 1 and '"world_size": 1' not in log
    stats = [json.loads(line) for line in (workdir / 'round01' / 'a1_b0.05' / 'stats.jsonl').read_text().splitlines()]
    assert [s['Progress/kimg'] for s in stats][-2:] == [0.992, 1.024]   # 32 images a step, 16 on each rank


def scripted(tmp_path, alpha, seconds, law='alpha_helps', kind='slurm'):
    """Points a<alpha>_b0.1 of the scripted backend: 8 steps, an evaluation every 2, `seconds` a step."""
    (tmp_path / 'pretrained.json').write_text('{"score": 10.0}')
    launcher = dict(kind=kind, env={'PYTHONPATH': TESTS}, **(dict(template=TEMPLATE, poll_seconds=0.2) if kind == 'slurm' else {}))
    return write_config(tmp_path / f'{kind}.toml', dict(backend='scripted_backend.ScriptedBackend', rounds=1,
                                                        pretrained='pretrained.json'),
                        dict(run=dict(duration=8, eval_every=2), sweep=dict(alpha=alpha, beta=[0.1]),
                             train=dict(law=law, seconds=seconds), evaluate=dict(metric='score'), launcher=launcher))


def scripted_manager(env, config, workdir, *options):
    """The arguments and environment of a manager that can import scripted_backend."""
    args = [sys.executable, '-m', 'ddo_patch.cli', 'rounds', 'run', config, '--workdir', str(workdir), *options]
    return args, dict(env, PYTHONPATH=os.pathsep.join(filter(None, [TESTS, env.get('PYTHONPATH')])))


def rounds_run(env, config, workdir, *options):
    args, env = scripted_manager(env, config, workdir, *options)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_a_cancelled_and_a_failing_job_are_recorded_failed_and_the_round_goes_on(tmp_path, cluster):
    workdir = tmp_path / 'work'
    args, env = scripted_manager(cluster, scripted(tmp_path, [1, 2, 3], 1, 'alpha_3_crashes'), workdir)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Cancelled while it trains (cancelled as its srun starts, the job can still write its own status: srun fails
    # with 'job has expired', exit status 1, also recorded failed, but not what this test is about).
    wait_for(lambda: (workdir / 'round01' / 'a2_b0.1' / 'snapshot-2.json').exists() or proc.poll() is not None, 'a2 to train')
    cancelled = job_id(workdir, 'a2_b0.1')
    slurm(cluster, 'scancel', cancelled)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    m = read_manifest(workdir)
    runs = {r['name']: r for r in m['rounds'][0]['runs']}
    assert {name: r['status'] for name, r in runs.items()} == {'a1_b0.1': 'done', 'a2_b0.1': 'failed', 'a3_b0.1': 'failed'}
    assert runs['a2_b0.1']['error'] == f'SLURM job {cancelled} CANCELLED before writing its status (log: round01/a2_b0.1.log)'
    assert runs['a2_b0.1']['exit_status'] is None and f'JOB {cancelled} ON' in (workdir / 'round01' / 'a2_b0.1.log').read_text()
    assert runs['a3_b0.1']['error'] == 'exit status 1 (log: round01/a3_b0.1.log)' and runs['a3_b0.1']['exit_status'] == 1
    assert 'RuntimeError: scripted crash: alpha 3' in (workdir / 'round01' / 'a3_b0.1.log').read_text()
    assert output.count('submitted round01-a2_b0.1 ') == 1   # a cancelled job is not submitted again
    assert m['status'] == 'done' and m['rounds'][0]['chosen']['run'] == 'a1_b0.1'


def test_a_no_wait_manager_called_again_finishes_the_round_after_slurm_forgot_the_jobs(tmp_path, cluster):
    rounds_run(cluster, scripted(tmp_path, [1, 2], 0.2, kind='local'), tmp_path / 'local')
    config, workdir = scripted(tmp_path, [1, 2], 0.2), tmp_path / 'work'
    def jobs():
        return list((workdir / 'round01').glob('*.job'))

    def call_when_ended(forgotten=False):
        wait_for(lambda: all(job.with_suffix('.status').exists() for job in jobs()), 'the jobs to end', timeout=120)
        if forgotten:   # Slurm forgets an ended job MinJobAge (here 5 s) after its end
            ids = [json.loads(job.read_text())['job_id'] for job in jobs()]
            wait_for(lambda: not any(state_of(cluster, i) for i in ids), 'Slurm to forget the jobs', timeout=120)
        return rounds_run(cluster, config, workdir, '--no-wait').stdout
    outputs = [rounds_run(cluster, config, workdir, '--no-wait').stdout]   # submits the reference's evaluation
    outputs.append(call_when_ended())                    # reads it back, submits the sweep points
    outputs.append(call_when_ended(forgotten=True))      # reads them back from their status files alone: done
    assert ['jobs of round 1 are queued' in output for output in outputs] == [True, True, False]
    assert read_manifest(workdir)['status'] == 'done'
    submitted = [line.split()[1] for line in ''.join(outputs).splitlines() if line.startswith('submitted ')]
    assert submitted == ['round01-reference-evaluation', 'round01-a1_b0.1', 'round01-a2_b0.1']   # each once
    assert comparable(read_manifest(workdir), LAUNCHER_KEYS) == comparable(read_manifest(tmp_path / 'local'), LAUNCHER_KEYS)


def test_halving_on_slurm_submits_nothing_more_for_a_stopped_point(tmp_path, cluster):
    config = halving_config(tmp_path, launcher=dict(kind='slurm', template=TEMPLATE, poll_seconds=0.2, env={'PYTHONPATH': TESTS}))
    workdir = tmp_path / 'work'
    output = rounds_run(cluster, config, workdir).stdout
    check_halving_round(workdir, read_manifest(workdir)['rounds'][0])
    submitted = [line.split()[1] for line in output.splitlines() if line.startswith('submitted ')]
    assert submitted == ['round01-reference-evaluation'] + [f'round01-a{a}_b0.1-to2' for a in (1, 2, 3, 4)] + \
        ['round01-a3_b0.1-to4', 'round01-a4_b0.1-to4', 'round01-a4_b0.1']
    # Every job ended by itself (a stopped point's at its rung): none was cancelled, none is queued.
    ids = [json.loads(f.read_text())['job_id'] for f in (workdir / 'round01').glob('*.job')]
    assert len(ids) == 8 and {state_of(cluster, i) for i in ids} <= {'COMPLETED', ''}
