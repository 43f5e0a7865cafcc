"""Running the round manager's jobs: one bash script per job, run here (`local`) or submitted (`slurm`).

A job (the reference samples of a round, or one sweep point: train, then evaluate) is a bash script
that runs its commands through the codebase's native launcher and, whatever happens, ends by writing
`<job>.status` ({"exit_status", "wall_seconds"}) atomically. Both launchers read completion back from
that file only, so a manager killed at any moment finds out on its rerun what finished, and a job
that did not finish is simply run again: every command in it resumes (upstream checkpoints, skipped
finished samples and snapshots) or is skipped when its output is complete (`Command.done_if`).
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

from ddo_patch.errors import DDOPatchError
from ddo_patch.rounds import manifest
from ddo_patch.rounds.backend import Command

# Set in the environment of local jobs, so that a rerun recognises (and stops) a killed manager's leftovers.
OWNER_ENV = 'DDO_PATCH_ROUNDS_WORKDIR'
RUNNING = '.running.json'


@dataclasses.dataclass
class Job:
    name: str                   # unique in the work directory, e.g. round01-a2_b0.05
    path: str                   # prefix of its files, relative to the work directory: .sh .log .status .job
    commands: list

    def file(self, suffix):
        return f'{self.path}.{suffix}'


def launch_prefix(launcher: dict) -> str:
    """What goes before `-m MODULE ARGS`: python itself, or torchrun (which takes -m too), as a shell fragment."""
    python = shlex.quote(sys.executable)
    if launcher['kind'] == 'slurm':
        return (f'srun --ntasks-per-node=1 {python} -m torch.distributed.run --nnodes={launcher["nodes"]} '
                f'--nproc_per_node={launcher["nproc_per_node"]} --rdzv_backend=c10d --rdzv_id="$SLURM_JOB_ID" '
                f'--rdzv_endpoint="$head_node:29500"')
    if launcher['nproc_per_node'] == 1:
        return python   # one process needs no torchrun
    return f'{python} -m torch.distributed.run --standalone --nproc_per_node={launcher["nproc_per_node"]}'


def command_line(launcher, command: Command) -> str:
    """The exact shell line a job runs for `command` (also what the manifest records)."""
    return f'{launch_prefix(launcher)} -m {command.module} {shlex.join(str(a) for a in command.args)}'


def job_script(workdir, launcher: dict, job: Job) -> str:
    status, tmp = shlex.quote(job.file('status')), shlex.quote(job.file('status') + '.tmp')
    lines = [f'cd {shlex.quote(os.path.abspath(workdir))}']
    lines += [f'export {key}={shlex.quote(value)}' for key, value in launcher['env'].items()]
    if launcher['kind'] == 'slurm':
        lines.append('head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)')
    lines += ['start=$SECONDS', 'rc=0']
    for command in job.commands:
        skip = f' && [ ! -e {shlex.quote(command.done_if)} ]' if command.done_if else ''
        lines += [f'if [ $rc -eq 0 ]{skip}; then', f'  {command_line(launcher, command)}', '  rc=$?', 'fi']
    lines += [f'printf \'{{"exit_status": %d, "wall_seconds": %d}}\\n\' "$rc" "$((SECONDS - start))" > {tmp} && mv {tmp} {status}',
              'exit $rc']
    fields = dict(job_name=job.name, nodes=str(launcher['nodes']), nproc_per_node=str(launcher['nproc_per_node']),
                  log=os.path.abspath(os.path.join(workdir, job.file('log'))), commands='\n'.join(lines))
    text = launcher['template']
    for key, value in fields.items():
        text = text.replace('{{' + key + '}}', value)
    return text


def read_status(workdir, job: Job) -> dict | None:
    return manifest.read_json(os.path.join(workdir, job.file('status')))


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
                manifest.write_json(os.path.join(self.workdir, job.file('status')), dict(exit_status=rc, wall_seconds=0))
            os.remove(os.path.join(self.workdir, RUNNING))
            on_done(job)
        return True


class SlurmLauncher:
    """Submits every job with sbatch, then (unless told not to wait) polls the run directories."""

    def __init__(self, workdir, launcher, wait=True):
        self.workdir, self.launcher, self.wait = workdir, launcher, wait

    def _submit(self, job):
        script = _write_script(self.workdir, self.launcher, job)
        proc = subprocess.run(['sbatch', '--parsable', script], cwd=self.workdir, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DDOPatchError(f'sbatch {script} failed: {(proc.stderr.strip().splitlines() or ["no output"])[-1]}')
        job_id = proc.stdout.strip().split(';')[0]
        manifest.write_json(os.path.join(self.workdir, job.file('job')), dict(job_id=job_id))
        print(f'submitted {job.name} as SLURM job {job_id}', flush=True)

    def _queued(self, job) -> bool:
        record = manifest.read_json(os.path.join(self.workdir, job.file('job')))
        if record is None:
            return False
        proc = subprocess.run(['squeue', '-h', '-j', record['job_id'], '-o', '%i'], capture_output=True, text=True)
        return proc.returncode == 0 and bool(proc.stdout.strip())

    def run(self, jobs, on_done):
        pending = list(jobs)
        while pending:
            for job in list(pending):
                if read_status(self.workdir, job) is not None:
                    pending.remove(job)
                    on_done(job)
                elif not self._queued(job):   # never submitted, or gone without a status (preempted, time limit)
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
