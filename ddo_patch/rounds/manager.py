"""The round manager: DDO self-play rounds with an alpha x beta sweep, the best snapshot of each round
promoted to be the next round's reference (paper section 3.3, appendix C).

Per round: the reference samples (edm2; from the round's own seeds, disjoint from every evaluation's and
other rounds'), one evaluation of the reference (round 1; later rounds take the score their reference was
chosen with), one job per sweep point (train and evaluate through the codebase's own entry points and
launcher; the reference is not evaluated again there), the best snapshot, which must beat the reference,
scores on the report seeds when the config has them, then the stop rule. Everything is recorded in
`<workdir>/manifest.json`, rewritten atomically after every step. A job's completion is read back from its
status file, so after a SIGKILL the same command continues: finished jobs are kept, an unfinished one is
run again and resumes inside (see `ddo_patch.rounds.launch`). Paths inside the work directory are recorded
relative to it, and every job runs in it.
"""

from __future__ import annotations

import fcntl
import math
import os

from ddo_patch.errors import DDOPatchError
from ddo_patch.rounds import config as rounds_config
from ddo_patch.rounds import control, manifest, race, sweep
from ddo_patch.rounds.backend import point_name
from ddo_patch.rounds.launch import (
    Job,
    command_line,
    forget,
    make_launcher,
    outcome,
    read_status,
    run_round_jobs,
)

MANIFEST_VERSION = 2


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
    old.setdefault('control', {})   # work directories started before [control] existed had none
    changed = sorted(k for k in set(old) | set(cfg.identity()) if old.get(k) != cfg.identity().get(k))
    if changed:
        raise DDOPatchError(f'{workdir} was started with a different configuration ({", ".join(changed)} changed); '
                            f'restore it or use a new --workdir (only {", ".join(rounds_config.CHANGEABLE)} may change)')
    previous['config'] = cfg.as_dict()
    return previous


def _run_record(workdir, backend, launcher, job, alpha, beta, options, run_dir, steps, name=None, objective='ddo',
                raced=None) -> dict:
    """The manifest entry of one finished job (a sweep point, or the control, trained to `steps`): its configuration,
    command lines, exit status, evaluations and best snapshot (with its content hash), what it cost, or why it failed.
    `raced`: under racing, the run's evaluations as the race left them (`ddo_patch.rounds.race`); the best is then
    the best of those scored on every selection seed."""
    status = read_status(workdir, job)
    record = dict(name=name or point_name(alpha, beta), objective=objective, alpha=alpha, beta=beta, options=options,
                  run_dir=run_dir, job=job.path,
                  images=backend.train_images(options, steps), commands=[command_line(launcher, c) for c in job.commands],
                  exit_status=status['exit_status'], wall_seconds=status['wall_seconds'],
                  interruptions=status.get('interruptions', 0), evaluations=[], best=None)
    result = dict(evaluations=[], error=f'{outcome(status, workdir, job)} (log: {job.file("log")})')
    if status['exit_status'] == 0:
        result = backend.collect(os.path.join(workdir, run_dir), **({} if raced is None else dict(evaluated=False)))
    evaluations = raced if raced is not None else \
        [dict(e, snapshot=os.path.relpath(e['snapshot'], workdir)) for e in result['evaluations']]
    bad = [e for e in evaluations if not math.isfinite(e['score'])]
    error = result['error'] or (f'non-finite {backend.metric_label()} at step {bad[0]["step"]}' if bad else None)
    record.update(status='failed' if error else 'done', error=error)
    finals = [e for e in evaluations if e.get('status', 'final') == 'final']
    if error is None:
        record['evaluations'] = evaluations
    if error is None and finals:
        best = min(finals, key=lambda e: (e['score'], e['step']))   # ties: the earlier snapshot
        record['best'] = dict(best, sha256=manifest.sha256(os.path.join(workdir, best['snapshot'])))
    record['evaluation_samples'] = sweep.run_evaluation_samples(backend, record)
    return record


REFERENCE = 'reference'   # the name a round's chosen snapshot has when no sweep point beat the round's reference


def _choose(record) -> dict:
    """The round's best snapshot. A sweep point must beat the reference (evaluated once per round, step 0) to be
    chosen; ties go to the reference, then to the earlier sweep point in (alpha, beta) order, then the earlier step."""
    reference = record['reference_evaluation']
    best = min([r for r in record['runs'] if r['best'] is not None],   # done, or stopped at a rung
               key=lambda r: (r['best']['score'], r['alpha'], r['beta'], r['best']['step']))
    if best['best']['score'] < reference['score']:
        return dict(run=best['name'], **best['best'])
    return dict(run=REFERENCE, step=0, snapshot=record['reference']['path'], score=reference['score'],
                sha256=record['reference']['sha256'])


def _stalled(cfg, record) -> bool:
    """A round stalls when it keeps its reference or improves on it by no more than stop.min_improvement."""
    return record['chosen']['run'] == REFERENCE or record['improvement'] <= cfg.stop['min_improvement']


def _stop_reason(cfg, rounds) -> str | None:
    """stop.patience stalled rounds in a row (lower metric is better)."""
    if cfg.stop['patience'] == 0:
        return None
    stalled = 0
    for record in rounds:
        stalled = stalled + 1 if record['stalled'] else 0
    if stalled >= cfg.stop['patience']:
        return (f'no improvement above {cfg.stop["min_improvement"]:g} for {stalled} round(s) in a row '
                f'(stop.patience = {cfg.stop["patience"]})')
    return None


def _failed(workdir, record, job, status, what):
    if status['exit_status'] != 0:
        raise DDOPatchError(f'round {record["round"]}: {what} failed ({outcome(status)}); '
                            f'see {os.path.join(workdir, job.file("log"))}, then rerun')


class _Evaluation:
    """One evaluation of a snapshot as its own job: 'select' (a round's reference, on the seeds that select) or
    'report' (on evaluate.report_seeds)."""

    def __init__(self, cfg, backend, record, snapshot, purpose, name):
        self.cfg, self.backend, self.record, self.snapshot, self.purpose = cfg, backend, record, snapshot, purpose
        self.dest = f'{record["dir"]}/{name}.json'   # name: reference-evaluation, report-reference, report-chosen
        self.command = backend.evaluation(snapshot, self.dest, purpose, cfg.round_options(record['round']))
        self.job = Job(name=f'{record["dir"]}-{name}', path=f'{record["dir"]}/{name}', commands=[self.command])

    def result(self, workdir, status) -> dict:
        _failed(workdir, self.record, self.job, status, f'evaluating {self.snapshot} ({self.purpose})')
        score = self.backend.read_evaluation(os.path.join(workdir, self.dest))
        if not math.isfinite(score):
            raise DDOPatchError(f'round {self.record["round"]}: {self.backend.metric_label()} of {self.snapshot} is {score}; '
                                f'see {os.path.join(workdir, self.dest)}')
        return dict(score=score, scores=self.backend.evaluation_scores(os.path.join(workdir, self.dest)), source='evaluated',
                    snapshot=self.snapshot, purpose=self.purpose, seeds=self.backend.evaluation_seeds(self.purpose),
                    command=command_line(self.cfg.launcher, self.command), **status)


def _previous_round(m, record):
    return m['rounds'][record['round'] - 2] if record['round'] > 1 else None


def _prepare_round(workdir, cfg, backend, launcher, m, record) -> str | bool | None:
    """The round's reference samples (edm2) and the reference's score, their jobs submitted together; the samples'
    path (None: sampled online), or False while a job is queued. The reference is evaluated in round 1 only; a
    later round's reference is the snapshot the previous round chose, with the score it was chosen with."""
    samples = backend.reference_samples(record['round'], record['dir'], record['reference']['path'])
    samples_job = samples and Job(name=f'{record["dir"]}-reference-samples', path=f'{record["dir"]}/reference-samples',
                                  commands=[samples.command])
    previous = _previous_round(m, record)
    if record['reference_evaluation'] is None and previous is not None:   # the reference is the snapshot it chose
        record['reference_evaluation'] = dict(score=previous['chosen']['score'], source=f'round {previous["round"]}')
    evaluation = None if record['reference_evaluation'] else \
        _Evaluation(cfg, backend, record, record['reference']['path'], 'select', 'reference-evaluation')
    statuses = run_round_jobs(workdir, launcher, [job for job in (samples_job, evaluation and evaluation.job) if job])
    if statuses is False:
        return False
    if samples:
        status = statuses[samples_job.name]
        record['reference_samples'] = dict(path=samples.path, seeds=samples.seeds,
                                           command=command_line(cfg.launcher, samples.command), **status)
        _failed(workdir, record, samples_job, status, 'generating the reference samples')
    if evaluation:
        record['reference_evaluation'] = evaluation.result(workdir, statuses[evaluation.job.name])
    record['reference_score'] = record['reference_evaluation']['score']
    return samples.path if samples else None


def _report(workdir, cfg, backend, launcher, m, record) -> bool:
    """With evaluate.report_seeds: {'reference': ..., 'chosen': ..., 'control': ...}, the snapshots' scores on seeds
    that select nothing, and in round 1 with evaluate.noise_seeds 'reference_noise', the reference on a second set of
    as many seeds (the report metric's own noise). A snapshot the previous round scored (this round's reference, a kept
    control start) is not evaluated again. False while queued."""
    if not backend.reports() or record['report'] is not None:
        return True
    previous = _previous_round(m, record)
    known = {} if previous is None else {(entry['snapshot'], entry.get('purpose', 'report')): dict(
        score=entry['score'], snapshot=entry['snapshot'], purpose=entry.get('purpose', 'report'), source=f'round {previous["round"]}')
        for entry in previous['report'].values()}
    wanted = dict(reference=(record['reference']['path'], 'report'), chosen=(record['chosen']['snapshot'], 'report'))
    if record.get('control'):
        wanted['control'] = (record['control']['chosen']['snapshot'], 'report')
    if record['round'] == 1 and backend.measures_noise():
        wanted['reference_noise'] = (record['reference']['path'], 'noise')
    todo = {key: _Evaluation(cfg, backend, record, key[0], key[1], f'{key[1]}-{role.split("_")[0]}')
            for role, key in reversed(list(wanted.items())) if key not in known}   # a kept reference: once
    statuses = run_round_jobs(workdir, launcher, [e.job for e in todo.values()])
    if statuses is False:
        return False
    known.update({key: e.result(workdir, statuses[e.job.name]) for key, e in todo.items()})
    record['report'] = {role: known[key] for role, key in wanted.items()}
    return True


def _forget_failed(workdir, record):
    """Drop the failed runs (the control's too) of an unfinished round, so that they run again (they resume where
    they can)."""
    for run in [r for r in record['runs'] if r['status'] == 'failed']:
        record['runs'].remove(run)
        forget(workdir, Job(name=run['name'], path=run['job'], commands=[]))
    if record.get('control') and record['control']['status'] == 'failed':
        forget(workdir, Job(name=control.NAME, path=record['control']['job'], commands=[]))
        record['control'] = None


def _sweep(workdir, cfg, backend, launcher, m, record, fake, save) -> bool:
    """Train and evaluate the round's sweep points, stage by stage (`ddo_patch.rounds.sweep`: one stage for the grid;
    for halving each rung, then the end); False while jobs are queued. Every rung decision (and, with racing, every
    race level) goes into the manifest as it is made, so a rerun continues with the same points."""
    options = cfg.round_options(record['round'])
    if record['points'] is None:
        record['points'] = [list(point) for point in sweep.round_points(cfg, _previous_round(m, record), record['round'])]
        save()
    active = [tuple(point) for point in record['points']]
    racing = bool(cfg.racing)
    for target in sweep.stages(cfg):
        decision = next((d for d in record['rungs'] if d['step'] == target), None)
        if decision is not None:
            active = [point for point in active if point_name(*point) in decision['kept']]
            continue
        final = target == cfg.duration
        recorded = {run['name'] for run in record['runs']}   # done, failed, or stopped at a rung
        jobs = {}
        for alpha, beta in [point for point in active if point_name(*point) not in recorded]:
            name, run_dir = point_name(alpha, beta), f'{record["dir"]}/{point_name(alpha, beta)}'
            job = Job(name=f'{record["dir"]}-{name}' + ('' if final else f'-to{target}'),
                      path=run_dir if final else f'{run_dir}.to{target}',
                      commands=backend.run_commands(record['round'], run_dir, record['reference']['path'], fake, alpha, beta,
                                                    options, stop_at=None if final else target,
                                                    **(dict(evaluate=False) if racing else {})))
            jobs[job.name] = (job, alpha, beta, run_dir)

        def finished(job, raced=None):
            job, alpha, beta, run_dir = jobs[job.name]
            return _run_record(workdir, backend, cfg.launcher, job, alpha, beta, options, run_dir, target, raced=raced)

        if final:
            begin = control.start(cfg, m, record) if cfg.control and not record.get('control') else None
            control_job = begin and control.job(cfg, backend, record, begin)

            def on_done(job):
                if control_job and job.name == control_job.name:
                    _add_control(workdir, cfg, backend, record, control_job, begin)
                elif not racing:   # with racing, a run is recorded once the race has scored it
                    _add_run(record, finished(job), backend)
                save()
            todo = [job for job, *_ in jobs.values()] + ([control_job] if control_job else [])
            if todo and not launcher.run(todo, on_done):
                return False
            if not racing:
                return True
        else:
            todo = [job for job, *_ in jobs.values() if read_status(workdir, job) is None]
            if todo and not launcher.run(todo, on_done=lambda _: None):
                return False
        runs = [finished(job) for job, *_ in jobs.values()]
        if racing:
            trained = [run for run in runs if run['status'] == 'done']
            for run in trained:
                race.enter(record, run['name'], [(step, os.path.relpath(path, workdir)) for step, path in
                                                 backend.snapshots(os.path.join(workdir, run['run_dir']), target)])
            kept_count = 1 if final else max(1, math.ceil(cfg.sweep['keep'] * len(trained)))
            if not race.run(workdir, cfg, backend, launcher, record, target, {run['name'] for run in trained}, kept_count, save):
                return False
            runs = [finished(job, raced=race.evaluations(record, point_name(alpha, beta))) if read_status(workdir, job)['exit_status'] == 0
                    else finished(job) for job, alpha, beta, _ in jobs.values()]
        if final:
            for run in runs:
                _add_run(record, run, backend)
            save()
            return True
        for run in runs:
            if run['status'] == 'failed':
                _add_run(record, run, backend)
        scores = {run['name']: (run['best']['score'], run['alpha'], run['beta']) for run in runs if run['best'] is not None}
        done = [run for run in runs if run['status'] == 'done']
        kept = sweep.survivors(scores, max(1, math.ceil(cfg.sweep['keep'] * len(done)))) if scores else []
        for run in done:
            if run['name'] not in kept:
                _add_run(record, dict(run, status='stopped', stopped_at=target), backend)
        record['rungs'].append(dict(step=target, scores={name: score[0] for name, score in scores.items()}, kept=kept,
                                    stopped=sorted({run['name'] for run in done} - set(kept),
                                                   key=lambda name: next((r['alpha'], r['beta']) for r in done if r['name'] == name))))
        save()
        print(f'round {record["round"]} rung {target}: kept {", ".join(kept) or "none"}; '
              f'stopped {", ".join(record["rungs"][-1]["stopped"]) or "none"}', flush=True)
        active = [point for point in active if point_name(*point) in kept]
    return True


def _add_control(workdir, cfg, backend, record, job, begin):
    """Record the round's finished control run and its choice (`ddo_patch.rounds.control`)."""
    run = _run_record(workdir, backend, cfg.launcher, job, None, None, cfg.control_options(record['round']),
                      job.path, cfg.duration, name=control.NAME, objective=cfg.control['objective'])
    record['control'] = dict(run, start=begin, chosen=control.choose(run, begin))
    chosen = record['control']['chosen']
    print(f'round {record["round"]} control ({cfg.control["objective"]}, from {begin["source"]}): {run["status"]}' +
          (f', chose {chosen["run"]} step {chosen["step"]}: {backend.metric_label()} {chosen["score"]:.4g}' if run['best'] else
           f' ({run["error"]})'), flush=True)


def _add_run(record, run, backend):
    record['runs'].append(run)
    record['runs'].sort(key=lambda r: (r['alpha'], r['beta']))
    where = f' at {run["stopped_at"]}' if run['status'] == 'stopped' else ''
    print(f'round {record["round"]} {run["name"]}: {run["status"]}{where}' +
          (f', best {backend.metric_label()} {run["best"]["score"]:.4g} at step {run["best"]["step"]}' if run['best'] else
           f' ({run["error"] or "no snapshot reached the last race level"})'), flush=True)


def _run_round(workdir, cfg, backend, launcher, m, record, retry_failed) -> bool:
    """Run (or continue) one round; False when jobs are still queued (slurm without waiting)."""
    save = lambda: manifest.save(workdir, m)  # noqa: E731
    if retry_failed:
        _forget_failed(workdir, record)
    fake = _prepare_round(workdir, cfg, backend, launcher, m, record)
    save()
    if fake is False:
        return False
    if not _sweep(workdir, cfg, backend, launcher, m, record, fake, save):
        save()
        return False
    if not any(r['best'] is not None for r in record['runs']):
        m['status'], m['stop_reason'] = 'failed', f'every run of round {record["round"]} failed'
        save()
        raise DDOPatchError(f'round {record["round"]}: all {len(record["runs"])} runs failed (' +
                            '; '.join(f'{r["name"]}: {r["error"]}' for r in record['runs']) + '); nothing to promote, '
                            'stopping (fix the cause, then rerun with --retry-failed)')
    record['chosen'] = _choose(record)
    record['improvement'] = record['reference_score'] - record['chosen']['score']
    record['stalled'] = _stalled(cfg, record)
    save()
    if not _report(workdir, cfg, backend, launcher, m, record):
        save()
        return False
    record['cost'] = sweep.round_cost(backend, record, sweep.stages(cfg))
    record['times'] = sweep.stage_times(workdir, record, cfg.duration)
    record['status'] = 'done'
    save()
    return True


def run(config_path, workdir, wait: bool = True, retry_failed: bool = False) -> dict:
    """Run or continue the rounds described by `config_path` in `workdir`; returns the manifest.
    `retry_failed`: run the failed sweep points of the unfinished round again (finished rounds stay as they are)."""
    cfg = rounds_config.load(config_path)
    backend = cfg.make_backend()
    workdir = os.path.abspath(workdir)   # jobs run in it: a relative path would be taken from there again
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
            previous = m['rounds'][-1]['chosen'] if m['rounds'] else None   # run 'reference': the reference was kept
            reference = dict(path=previous['snapshot'], sha256=previous['sha256'], promoted_from=previous['run']) if previous \
                else dict(path=cfg.pretrained, sha256=manifest.sha256(cfg.pretrained), promoted_from=None)
            m['rounds'].append(dict(round=round_idx, dir=round_dir(round_idx), status='running', reference=reference,
                                    reference_samples=None, reference_evaluation=None, points=None, rungs=[], runs=[],
                                    chosen=None, reference_score=None, improvement=None, stalled=None, control=None, report=None,
                                    cost=None))
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
