"""Running the round manager's jobs: one bash script per job, run here (`local`) or submitted (`slurm`).

A job (the reference samples of a round, or one sweep point: train, then evaluate) is a bash script
that runs its commands through the codebase's native launcher and, whatever happens, ends by writing
`<job>.status` ({"exit_status", "wall_seconds"}) atomically. Both launchers read completion back from
that file only, so a manager killed at any moment finds out on its rerun what finished, and a job
that did not finish is simply run again: every command in it resumes (upstream checkpoints, skipped
finished samples and snapshots) or is skipped when its output is complete (`Command.done_if`).
Every start of a job adds a line to `<job>.starts`, so the status also says how often it was interrupted
(a manager killed mid-job, a SLURM requeue or resubmission) before the attempt that finished.

On SLURM (tested against Slurm 22.05, tests/test_rounds_slurm.py) the launcher itself chooses what the
manager depends on: the log path (`--output`, appended to, so that a requeued job keeps its first
attempt's log), `--requeue` (preemption puts the job back in the queue under the same id), `--nodes`
(what torchrun is told) and `--signal=B:USR1@<signal_lead>` (a warning before the time limit or a preemption,
which the job passes on to its training processes before it requeues itself: `SIGNAL_FORWARDING`); a job
whose training processes alone were signalled writes status 75 and is submitted again. A job that ends without writing its status is told apart by its state in
`squeue -t all`: cancelled or failed (someone's decision or a fault that recurs) is recorded as failed,
with the log path; out of time, preempted without requeue, node failure, or no longer listed (Slurm forgets
ended jobs after MinJobAge) is submitted again and resumes.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import psutil

from ddo_patch.errors import EXIT_INTERRUPTED, DDOPatchError
from ddo_patch.rounds import manifest
from ddo_patch.rounds.backend import Command

# Set in the environment of local jobs, so that a rerun recognises (and stops) a killed manager's leftovers.
OWNER_ENV = 'DDO_PATCH_ROUNDS_WORKDIR'
RUNNING = '.running.json'


@dataclasses.dataclass
class Job:
    name: str                   # unique in the work directory, e.g. round01-a2_b0.05
    path: str                   # prefix of its files, relative to the work directory: .sh .log .status .starts .job
    commands: list

    def file(self, suffix):
        return f'{self.path}.{suffix}'


def _one_process(launcher) -> bool:
    return launcher['nodes'] == 1 and launcher['nproc_per_node'] == 1   # one process needs no torchrun


def launch_prefix(launcher: dict) -> str:
    """What goes before `-m MODULE ARGS`: python itself, or torchrun (which takes -m too), as a shell fragment."""
    python = shlex.quote(sys.executable)
    if launcher['kind'] == 'slurm':
        if _one_process(launcher):
            return f'srun --ntasks-per-node=1 {python}'
        return (f'srun --ntasks-per-node=1 {python} -m torch.distributed.run --nnodes={launcher["nodes"]} '
                f'--nproc_per_node={launcher["nproc_per_node"]} --rdzv_backend=c10d --rdzv_id="$SLURM_JOB_ID" '
                f'--rdzv_endpoint="$head_node:$rdzv_port"')
    if _one_process(launcher):
        return python
    return f'{python} -m torch.distributed.run --standalone --nproc_per_node={launcher["nproc_per_node"]}'


def command_line(launcher, command: Command) -> str:
    """The exact shell line a job runs for `command` (also what the manifest records)."""
    return f'{launch_prefix(launcher)} -m {command.module} {shlex.join(str(a) for a in command.args)}'


# A SLURM job script's signal handling. The warning the launcher asks for (sbatch --signal=B:USR1@lead) and a SIGTERM
# reach the batch shell; it passes them on to the job steps as SIGTERM (torchrun passes SIGTERM on to its workers,
# while SIGUSR1 would end it): the training processes finish the step in progress, write their state and exit with
# 75. After the warning the job requeues itself and resumes; after a SIGTERM alone Slurm decides what follows (its
# own requeue, a resubmission by the manager after a time limit, or a cancellation, recorded as failed).
SIGNAL_FORWARDING = ['warned=0 signalled=0',
                     'trap \'warned=1 signalled=1; scancel --signal=TERM "$SLURM_JOB_ID"\' USR1',
                     'trap \'signalled=1; scancel --signal=TERM "$SLURM_JOB_ID"\' TERM']


def job_script(workdir, launcher: dict, job: Job) -> str:
    status, tmp = shlex.quote(job.file('status')), shlex.quote(job.file('status') + '.tmp')
    starts = shlex.quote(job.file('starts'))
    lines = [f'cd {shlex.quote(os.path.abspath(workdir))}']
    lines += [f'export {key}={shlex.quote(value)}' for key, value in launcher['env'].items()]
    if launcher['kind'] == 'slurm' and not _one_process(launcher):
        lines += ['head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
                  'rdzv_port=$((29500 + SLURM_JOB_ID % 10000))   # two jobs on one node must not share a port']
    lines += [f'echo "$(date -u +%FT%TZ) job ${{SLURM_JOB_ID:-local}} restart ${{SLURM_RESTART_COUNT:-0}}" >> {starts}',
              'start=$SECONDS', 'rc=0']
    slurm = launcher['kind'] == 'slurm'
    if slurm:
        lines += SIGNAL_FORWARDING
    for command in job.commands:
        skip = f' && [ ! -e {shlex.quote(command.done_if)} ]' if command.done_if else ''
        if slurm:   # in the background: bash runs a trap only between commands, and `wait` returns for it
            lines += [f'if [ $rc -eq 0 ]{skip}; then', f'  {command_line(launcher, command)} &', '  child=$!',
                      '  while :; do wait "$child"; rc=$?; kill -0 "$child" 2>/dev/null || break; done', 'fi']
        else:
            lines += [f'if [ $rc -eq 0 ]{skip}; then', f'  {command_line(launcher, command)}', '  rc=$?', 'fi']
    if slurm:   # stopped by a signal: no status (the job is not over); after the warning it requeues itself
        lines += ['if [ $signalled -eq 1 ] && [ $rc -ne 0 ]; then',
                  '  if [ $warned -eq 1 ]; then scontrol requeue "$SLURM_JOB_ID"; fi', '  exit $rc', 'fi']
    lines += [(f'printf \'{{"exit_status": %d, "wall_seconds": %d, "interruptions": %d}}\\n\' "$rc" "$((SECONDS - start))" '
               f'"$(($(wc -l < {starts}) - 1))" > {tmp} && mv {tmp} {status}'),
              'exit $rc']
    fields = dict(job_name=job.name, nodes=str(launcher['nodes']), nproc_per_node=str(launcher['nproc_per_node']),
                  log=os.path.abspath(os.path.join(workdir, job.file('log'))), commands='\n'.join(lines))
    text = launcher['template']
    for key, value in fields.items():
        text = text.replace('{{' + key + '}}', value)
    return text


def read_status(workdir, job: Job) -> dict | None:
    return manifest.read_json(os.path.join(workdir, job.file('status')))


def _write_status(workdir, job, exit_status, reason=None):
    """The status of a job that could not write its own (killed before its last line): how it ended, per the launcher."""
    starts = os.path.join(workdir, job.file('starts'))
    interruptions = 0
    if os.path.exists(starts):   # not when it was cancelled before it started
        with open(starts) as f:
            interruptions = len(f.readlines()) - 1
    manifest.write_json(os.path.join(workdir, job.file('status')),
                        dict(exit_status=exit_status, wall_seconds=0, interruptions=interruptions, reason=reason))


def outcome(status, workdir=None, job=None) -> str:
    """How a job ended, in words: its exit status, or why it has none; with the job, the last one-line error its log
    ends with (every entry point reports bad input or a diverged run as `error: ...`), first."""
    ended = status.get('reason') or f'exit status {status["exit_status"]}'
    log = os.path.join(workdir, job.file('log')) if job is not None else None
    if status['exit_status'] == 0 or log is None or not os.path.isfile(log):
        return ended
    with open(log, errors='replace') as f:
        errors = [line[len('error: '):].strip() for line in f.readlines()[-50:] if line.startswith('error: ')]
    return f'{errors[-1]}; {ended}' if errors else ended


def forget(workdir, job) -> None:
    """Make a finished job unfinished, so that it runs again (its interruptions count from zero)."""
    for suffix in ('status', 'starts'):
        if os.path.exists(os.path.join(workdir, job.file(suffix))):
            os.remove(os.path.join(workdir, job.file(suffix)))


def run_round_jobs(workdir, launcher, jobs) -> dict | bool:
    """Run round-level jobs (reference samples, evaluations) that have not finished, together (on SLURM: submitted at
    once); {job name: status}, or False while any is queued. A job that failed in an earlier invocation runs again."""
    for job in jobs:
        status = read_status(workdir, job)
        if status is not None and status['exit_status'] != 0:
            forget(workdir, job)
    todo = [job for job in jobs if read_status(workdir, job) is None]
    if todo and not launcher.run(todo, on_done=lambda _: None):
        return False
    return {job.name: read_status(workdir, job) for job in jobs}


def _write_script(workdir, launcher, job) -> str:
    path = os.path.join(workdir, job.file('sh'))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(job_script(workdir, launcher, job))
    return path


def stop_leftovers(workdir) -> None:
    """Kill the process group of a local job whose manager was killed (it would race the rerun)."""
    record = manifest.read_json(os.path.join(workdir, RUNNING))
    if not record:
        return
    owner = os.path.abspath(workdir)
    mine = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == record['pgid'] and proc.environ().get(OWNER_ENV) == owner:
                mine.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    if mine:
        print(f'stopping {len(mine)} leftover process(es) of the interrupted job {record["job"]}', flush=True)
        os.killpg(record['pgid'], signal.SIGKILL)
        psutil.wait_procs(mine, timeout=30)
    os.remove(os.path.join(workdir, RUNNING))


class LocalLauncher:
    """Runs each job to its end, one after another, on this node."""

    def __init__(self, workdir, launcher):
        self.workdir, self.launcher = workdir, launcher

    def run(self, jobs, on_done):
        for job in jobs:
            script = _write_script(self.workdir, self.launcher, job)
            env = dict(os.environ, **{OWNER_ENV: os.path.abspath(self.workdir)})
            with open(os.path.join(self.workdir, job.file('log')), 'a') as log:
                proc = subprocess.Popen(['bash', script], cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
                manifest.write_json(os.path.join(self.workdir, RUNNING), dict(job=job.name, pgid=proc.pid, log=job.file('log')))
                try:
                    rc = proc.wait()
                except BaseException:   # Ctrl-C or SIGTERM (see ddo_patch.rounds.cli): the job runs in its own session, stop it too
                    os.killpg(proc.pid, signal.SIGKILL)
                    raise
            if read_status(self.workdir, job) is None:   # bash itself was killed before it could write it
                _write_status(self.workdir, job, rc)
            os.remove(os.path.join(self.workdir, RUNNING))
            on_done(job)
        return True


# squeue states of a job that has not ended (a requeued job is PENDING again, under the same id).
SLURM_ACTIVE = {'PENDING', 'CONFIGURING', 'RUNNING', 'COMPLETING', 'SUSPENDED', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED',
                'RESIZING', 'SIGNALING', 'STAGE_OUT', 'STOPPED', 'SPECIAL_EXIT', 'RESV_DEL_HOLD'}
# Ended without a status by someone's decision or by a fault that would recur: the job failed. Any other end
# (TIMEOUT, PREEMPTED, NODE_FAIL, no longer listed) is submitted again and resumes.
SLURM_FAILED = {'CANCELLED', 'FAILED', 'OUT_OF_MEMORY', 'BOOT_FAIL', 'DEADLINE'}


def _last_line(text) -> str:
    return (text.strip().splitlines() or ['no output'])[-1]


class SlurmLauncher:
    """Submits every job with sbatch, then (unless told not to wait) polls the run directories and `squeue`."""

    def __init__(self, workdir, launcher, wait=True):
        self.workdir, self.launcher, self.wait = workdir, launcher, wait

    def _submit(self, job):
        script = _write_script(self.workdir, self.launcher, job)
        log = os.path.abspath(os.path.join(self.workdir, job.file('log')))
        warning = [f'--signal=B:USR1@{self.launcher["signal_lead"]}'] if self.launcher['signal_lead'] else []
        proc = subprocess.run(['sbatch', '--parsable', f'--output={log}', '--open-mode=append', '--requeue',
                               f'--nodes={self.launcher["nodes"]}', *warning, script], cwd=self.workdir, capture_output=True,
                              text=True, check=False)
        if proc.returncode != 0:
            raise DDOPatchError(f'sbatch {script} failed: {_last_line(proc.stderr)}')
        job_id = proc.stdout.strip().split(';')[0]
        manifest.write_json(os.path.join(self.workdir, job.file('job')), dict(job_id=job_id))
        print(f'submitted {job.name} as SLURM job {job_id}', flush=True)

    def _job_id(self, job):
        record = manifest.read_json(os.path.join(self.workdir, job.file('job')))
        return record and record['job_id']

    def _states(self, jobs) -> dict | None:
        """{job id: state} of the jobs' SLURM jobs that squeue still lists (ended ones too); None when squeue fails."""
        ids = [job_id for job_id in map(self._job_id, jobs) if job_id]
        if not ids:
            return {}
        proc = subprocess.run(['squeue', '-h', '-t', 'all', '-j', ','.join(ids), '-o', '%i %T'], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            if 'Invalid job id' in proc.stderr:   # every one of them forgotten (MinJobAge)
                return {}
            print(f'squeue failed ({_last_line(proc.stderr)}); asking again later', flush=True)
            return None
        return dict(line.split()[:2] for line in proc.stdout.splitlines() if line.strip())

    def run(self, jobs, on_done):
        pending = list(jobs)
        while pending:
            # squeue first, the status files after: a job that ends in between is read back, not submitted again
            states = self._states([job for job in pending if read_status(self.workdir, job) is None])
            for job in list(pending):
                job_id = self._job_id(job)
                state = None if states is None or job_id is None else states.get(job_id, 'not listed by squeue')
                status = read_status(self.workdir, job)
                if status is None and state in SLURM_FAILED:
                    _write_status(self.workdir, job, None, f'SLURM job {job_id} {state} before writing its status')
                    status = read_status(self.workdir, job)
                if status is not None and status['exit_status'] == EXIT_INTERRUPTED:   # its steps alone were signalled
                    print(f'{job.name} was interrupted and wrote its state (exit status {EXIT_INTERRUPTED}); submitting it again',
                          flush=True)
                    os.remove(os.path.join(self.workdir, job.file('status')))
                    self._submit(job)
                elif status is not None:
                    pending.remove(job)
                    on_done(job)
                elif states is not None and state not in SLURM_ACTIVE:   # never submitted, lost, or out of time
                    if state is not None:
                        print(f'SLURM job {job_id} of {job.name} ended without a status ({state}); submitting it again', flush=True)
                    self._submit(job)
            if pending and not self.wait:
                return False
            if pending:
                time.sleep(self.launcher['poll_seconds'])
        return True


def make_launcher(workdir, launcher, wait=True):
    if launcher['kind'] == 'slurm':
        missing = [tool for tool in ('sbatch', 'squeue') if shutil.which(tool) is None]
        if missing:
            raise DDOPatchError(f'launcher.kind is slurm, but {" and ".join(missing)} is not on PATH; run on a SLURM login node')
        return SlurmLauncher(workdir, launcher, wait)
    stop_leftovers(workdir)
    return LocalLauncher(workdir, launcher)
