"""The round manager: DDO self-play rounds with an alpha x beta sweep, the best snapshot of each round
promoted to be the next round's reference (paper section 3.3, appendix C).

Per round: the reference samples (edm2; skipped when complete), one job per sweep point (train and
evaluate through the codebase's own entry points and launcher), the best snapshot over all points,
then the stop rule. Everything is recorded in `<workdir>/manifest.json`, rewritten atomically after
every step. A job's completion is read back from its status file, so after a SIGKILL the same command
continues: finished jobs are kept, an unfinished one is run again and resumes inside (see
`ddo_patch.rounds.launch`). Paths inside the work directory are recorded relative to it, and every job runs in it.
"""

from __future__ import annotations

import fcntl
import math
import os

from ddo_patch.errors import DDOPatchError
from ddo_patch.rounds import config as rounds_config
from ddo_patch.rounds import manifest
from ddo_patch.rounds.backend import point_name
from ddo_patch.rounds.launch import Job, command_line, make_launcher, read_status

MANIFEST_VERSION = 1


def round_dir(round_idx: int) -> str:
    return f'round{round_idx:02d}'


def _lock(workdir):
    """One manager per work directory; the lock goes away with the process, however it ends."""
    handle = open(os.path.join(workdir, '.lock'), 'w')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DDOPatchError(f'{workdir} is in use by another `ddo-patch rounds run`; wait for it to end') from None
    return handle


def _start_manifest(workdir, cfg, backend) -> dict:
    previous = manifest.load(workdir)
    if previous is None:
        return dict(version=MANIFEST_VERSION, config=cfg.as_dict(), backend=backend.name, metric=backend.metric_label(),
                    step_unit=backend.step_unit,
                    status='running', stop_reason=None, rounds=[])
    old = {k: v for k, v in previous['config'].items() if k not in rounds_config.CHANGEABLE + ('source',)}
    changed = sorted(k for k in set(old) | set(cfg.identity()) if old.get(k) != cfg.identity().get(k))
    if changed:
        raise DDOPatchError(f'{workdir} was started with a different configuration ({", ".join(changed)} changed); '
                            f'restore it or use a new --workdir (only {", ".join(rounds_config.CHANGEABLE)} may change)')
    previous['config'] = cfg.as_dict()
    return previous


def _run_record(workdir, backend, launcher, job, alpha, beta, options, run_dir) -> dict:
    """The manifest entry of one finished job: its configuration, command lines, exit status, evaluations and
    best snapshot (with its content hash), or why it failed."""
    status = read_status(workdir, job)
    record = dict(name=point_name(alpha, beta), alpha=alpha, beta=beta, options=options, run_dir=run_dir,
                  images=backend.images_per_run(options), commands=[command_line(launcher, c) for c in job.commands],
                  exit_status=status['exit_status'], wall_seconds=status['wall_seconds'], evaluations=[], best=None)
    result = backend.collect(os.path.join(workdir, run_dir)) if status['exit_status'] == 0 else \
        dict(evaluations=[], error=f'exit status {status["exit_status"]} (log: {job.file("log")})')
    bad = [e for e in result['evaluations'] if not math.isfinite(e['score'])]
    error = result['error'] or (f'non-finite {backend.metric_label()} at step {bad[0]["step"]}' if bad else None)
    record.update(status='failed' if error else 'done', error=error)
    if error is None:
        record['evaluations'] = [dict(e, snapshot=os.path.relpath(e['snapshot'], workdir)) for e in result['evaluations']]
        best = min(record['evaluations'], key=lambda e: (e['score'], e['step']))   # ties: the earlier snapshot
        record['best'] = dict(best, sha256=manifest.sha256(os.path.join(workdir, best['snapshot'])))
    return record


def _choose(runs) -> dict:
    """The round's best snapshot; ties go to the earlier sweep point in (alpha, beta) order, then the earlier step."""
    done = [r for r in runs if r['status'] == 'done']
    best = min(done, key=lambda r: (r['best']['score'], r['alpha'], r['beta'], r['best']['step']))
    return dict(run=best['name'], **best['best'])


def _stop_reason(cfg, rounds) -> str | None:
    """Improvement below stop.min_improvement for stop.patience consecutive rounds (lower metric is better)."""
    if cfg.stop['patience'] == 0:
        return None
    stalled = 0
    for record in rounds:
        stalled = stalled + 1 if record['improvement'] is None or record['improvement'] < cfg.stop['min_improvement'] else 0
    if stalled >= cfg.stop['patience']:
        return (f'improvement below {cfg.stop["min_improvement"]:g} for {stalled} round(s) in a row '
                f'(stop.patience = {cfg.stop["patience"]})')
    return None


def _reference_samples(workdir, cfg, backend, launcher, record) -> str | bool | None:
    """Make sure the round's reference samples exist; their path, None (none needed), or False (still queued)."""
    fake, command = backend.reference_samples(record['dir'], record['reference']['path'])
    if command is None:
        return None
    job = Job(name=f'{record["dir"]}-reference-samples', path=f'{record["dir"]}/reference-samples', commands=[command])
    status = read_status(workdir, job)
    if status is not None and status['exit_status'] != 0:
        os.remove(os.path.join(workdir, job.file('status')))   # failed in an earlier invocation: try again (it resumes)
        status = None
    if status is None and not launcher.run([job], on_done=lambda _: None):
        return False
    status = read_status(workdir, job)
    record['reference_samples'] = dict(path=fake, command=command_line(cfg.launcher, command), **status)
    if status['exit_status'] != 0:
        raise DDOPatchError(f'round {record["round"]}: generating the reference samples failed with exit status '
                            f'{status["exit_status"]}; see {os.path.join(workdir, job.file("log"))}, then rerun')
    return fake


def _forget_failed(workdir, record):
    """Drop the failed runs of an unfinished round, so that they run again (they resume where they can)."""
    for run in [r for r in record['runs'] if r['status'] == 'failed']:
        record['runs'].remove(run)
        os.remove(os.path.join(workdir, f'{run["run_dir"]}.status'))


def _run_round(workdir, cfg, backend, launcher, m, record, retry_failed) -> bool:
    """Run (or continue) one round; False when jobs are still queued (slurm without waiting)."""
    save = lambda: manifest.save(workdir, m)  # noqa: E731
    if retry_failed:
        _forget_failed(workdir, record)
    fake = _reference_samples(workdir, cfg, backend, launcher, record)
    if fake is False:
        save()
        return False
    save()
    options = cfg.round_options(record['round'])
    jobs, pending = {}, []
    for alpha, beta in cfg.sweep_points():
        run_dir = f'{record["dir"]}/{point_name(alpha, beta)}'
        job = Job(name=f'{record["dir"]}-{point_name(alpha, beta)}', path=run_dir,
                  commands=backend.run_commands(run_dir, record['reference']['path'], fake, alpha, beta, options))
        jobs[job.name] = (job, alpha, beta, run_dir)
        if not any(r['name'] == point_name(alpha, beta) for r in record['runs']):
            pending.append(job)

    def on_done(job):
        job, alpha, beta, run_dir = jobs[job.name]
        run = _run_record(workdir, backend, cfg.launcher, job, alpha, beta, options, run_dir)
        record['runs'].append(run)
        record['runs'].sort(key=lambda r: (r['alpha'], r['beta']))
        save()
        print(f'round {record["round"]} {run["name"]}: {run["status"]}' +
              (f', best {backend.metric_label()} {run["best"]["score"]:.4g} at step {run["best"]["step"]}' if run['best'] else
               f' ({run["error"]})'), flush=True)

    if pending and not launcher.run(pending, on_done):
        save()
        return False
    if not any(r['status'] == 'done' for r in record['runs']):
        m['status'], m['stop_reason'] = 'failed', f'every run of round {record["round"]} failed'
        save()
        raise DDOPatchError(f'round {record["round"]}: all {len(record["runs"])} runs failed (' +
                            '; '.join(f'{r["name"]}: {r["error"]}' for r in record['runs']) + '); nothing to promote, '
                            'stopping (fix the cause, then rerun with --retry-failed)')
    record['chosen'] = _choose(record['runs'])
    baselines = [e['score'] for r in record['runs'] if r['status'] == 'done' for e in r['evaluations'] if e['step'] == 0]
    record['reference_score'] = min(baselines) if baselines else None
    previous = m['rounds'][-2]['chosen']['score'] if len(m['rounds']) > 1 else record['reference_score']
    record['improvement'] = previous - record['chosen']['score'] if previous is not None else None
    record['status'] = 'done'
    save()
    return True


def run(config_path, workdir, wait: bool = True, retry_failed: bool = False) -> dict:
    """Run or continue the rounds described by `config_path` in `workdir`; returns the manifest.
    `retry_failed`: run the failed sweep points of the unfinished round again (finished rounds stay as they are)."""
    cfg = rounds_config.load(config_path)
    backend = cfg.make_backend()
    os.makedirs(workdir, exist_ok=True)
    lock = _lock(workdir)  # noqa: F841 (held until we return)
    m = _start_manifest(workdir, cfg, backend)
    m['status'], m['stop_reason'] = 'running', None   # a rerun after a change of rounds or stop goes on
    launcher = make_launcher(workdir, cfg.launcher, wait)
    for round_idx in range(1, cfg.rounds + 1):
        reason = _stop_reason(cfg, [r for r in m['rounds'] if r['status'] == 'done'])
        if reason:
            m['status'], m['stop_reason'] = 'stopped', reason
            break
        if round_idx > len(m['rounds']):
            previous = m['rounds'][-1]['chosen'] if m['rounds'] else None
            reference = dict(path=previous['snapshot'], sha256=previous['sha256'], promoted_from=previous['run']) if previous \
                else dict(path=cfg.pretrained, sha256=manifest.sha256(cfg.pretrained), promoted_from=None)
            m['rounds'].append(dict(round=round_idx, dir=round_dir(round_idx), status='running', reference=reference,
                                    reference_samples=None, runs=[], chosen=None, reference_score=None, improvement=None))
            os.makedirs(os.path.join(workdir, round_dir(round_idx)), exist_ok=True)
            manifest.save(workdir, m)
        record = m['rounds'][round_idx - 1]
        if record['status'] == 'done':
            continue
        print(f'round {round_idx}/{cfg.rounds}: reference {record["reference"]["path"]}', flush=True)
        if not _run_round(workdir, cfg, backend, launcher, m, record, retry_failed):
            print(f'jobs of round {round_idx} are queued; rerun the same command to continue', flush=True)
            return m
    else:
        m['status'] = 'done'
    manifest.save(workdir, m)
    return m
