"""Which sweep points a round runs, when the worse ones stop, and what a round costs.

- `grid` (the default, the paper's): every (alpha, beta) of [sweep] runs the whole round.
- `halving`: successive halving in synchronous rungs. All points train to the first rung (a step count of
  [sweep] rungs) and are evaluated there; the better `keep` fraction (at least one point), ranked by their
  best score so far, goes on to the next rung, the others stop there; the survivors of the last rung run
  to the end of the round. A rung is a partial run that the next stage resumes from its checkpoint, so
  nothing is killed: a stopped point simply gets no further job (on SLURM nothing of it is queued or
  resubmitted), its checkpoints and evaluations stay on disk and in the manifest (status `stopped`,
  `stopped_at`), and the decisions are made on complete evaluations only, the same on every launcher and
  again after a crash (they are in the manifest). Every evaluated snapshot of every point, stopped ones
  included, competes for the round's choice.
- `random`: each round runs `count` points drawn from the grid without replacement (seeded by `seed` and the
  round), each to the end of the round: the baseline a cheaper policy must beat at the same cost.
- `carry = true`: round n+1 sweeps round n's chosen (alpha, beta) and its neighbours in the [sweep] lists
  (up to 3 x 3 points) instead of the whole grid; a round that kept its reference sweeps the whole grid.

Cost is counted in MLE-image equivalents, the cost of one maximum-likelihood training image (forward and
backward, about three network evaluations): a DDO training image costs `backend.ddo_image_cost` of them
(measured: 2.5 for EDM2, 3.4 for VAR with its online sampling, benchmarks/step_cost.py), a generated sample
`backend.sample_cost` (EDM2: 2 steps - 1 network evaluations, a third of an image each).

Wall time is measured, not modelled: every job writes its start (`.starts`) and its wall seconds (`.status`), so
`stage_times` reads back, per stage of a round, how many jobs ran, their seconds summed (each with its own
start-up: interpreter, imports, loading the model) and the time from the first start to the last end.
"""

from __future__ import annotations

import datetime
import glob
import os
import random
import re

from ddo_patch.rounds import manifest


def round_points(cfg, previous, round_idx) -> list:
    """The (alpha, beta) points of a round, in the grid's (alpha-major) order."""
    grid = [(alpha, beta) for alpha in cfg.alphas for beta in cfg.betas]
    if cfg.sweep['policy'] == 'random':
        drawn = random.Random(f'{cfg.sweep["seed"]}-{round_idx}').sample(range(len(grid)), min(cfg.sweep['count'], len(grid)))
        return [grid[i] for i in sorted(drawn)]
    if not cfg.sweep['carry'] or previous is None or previous['chosen']['run'] == 'reference':
        return grid
    chosen = next(r for r in previous['runs'] if r['name'] == previous['chosen']['run'])
    i, j = cfg.alphas.index(chosen['alpha']), cfg.betas.index(chosen['beta'])
    return [(alpha, beta) for alpha in cfg.alphas[max(i - 1, 0):i + 2] for beta in cfg.betas[max(j - 1, 0):j + 2]]


def stages(cfg) -> list:
    """The steps each stage of a round trains to: the rungs (halving), then the end of the round."""
    return list(cfg.sweep['rungs']) + [cfg.duration]


def survivors(best_scores: dict, count: int) -> list:
    """The names that go on from a rung: the `count` best of {name: (score, alpha, beta)} (the manager passes the
    better `keep` fraction of the rung's points, rounded up, at least one), ties to the smaller alpha, then beta
    (the grid's order)."""
    ranked = sorted(best_scores, key=lambda name: best_scores[name])
    return sorted(ranked[:count], key=lambda name: best_scores[name][1:])


def run_cost(backend, run) -> float:
    """MLE-image equivalents of one run (a sweep point, or the control, whose images cost one each): its training
    images and the samples its evaluations generated (with racing, each snapshot's samples)."""
    return run['images'] * _image_cost(backend, run) + run_evaluation_samples(backend, run) * backend.sample_cost('select')


def _image_cost(backend, run) -> float:
    """MLE-image equivalents of one of the run's training images (the control's MLE images cost one each)."""
    return 1.0 if run.get('objective') == 'mle' else backend.ddo_image_cost


def run_evaluation_samples(backend, run) -> int:
    return sum(e.get('samples', backend.evaluation_samples('select')) for e in run['evaluations'])


def round_cost(backend, record, steps) -> dict:
    """What the round spent (its control included): images trained, samples generated, and all of it in MLE-image
    equivalents, in all and per stage (`stage_costs`); with a control, also what the control's run cost alone."""
    evaluations = [e for e in [record['reference_evaluation']] + list((record.get('report') or {}).values())
                   if e and e.get('source') == 'evaluated']
    runs = record['runs'] + ([record['control']] if record.get('control') else [])
    samples = backend.reference_sample_count(record['round']) if record.get('reference_samples') else 0
    stages = stage_costs(backend, record, steps)
    return dict(train_images=sum(run['images'] for run in runs),
                evaluation_samples=sum(run_evaluation_samples(backend, run) for run in runs) +
                sum(backend.evaluation_samples(e['purpose']) for e in evaluations),
                reference_samples=samples, mle_equivalents=sum(stages.values()), stages=stages,
                **({'control_mle_equivalents': run_cost(backend, record['control'])} if record.get('control') else {}))


def stage_names(steps) -> list:
    """The stages of a round whose sweep trains to `steps` (the rungs, then the end), with the round's own around them."""
    return ['reference'] + [f'rung {step}' for step in steps[:-1]] + ['end', 'report']


def stage_costs(backend, record, steps) -> dict:
    """MLE-image equivalents per stage (`stage_names`): the reference's samples and evaluation; per rung and the end,
    the images each run trained in that stage and the samples of the snapshots written in it (with racing, what
    each reached); the report's evaluations. The control trains and is evaluated in the end stage."""
    names = stage_names(steps)
    costs = dict.fromkeys(names, 0.0)
    if record.get('reference_samples'):
        costs['reference'] += backend.reference_sample_count(record['round']) * backend.sample_cost('reference')
    for key, entry in [('reference', record['reference_evaluation'])] + [('report', e) for e in (record.get('report') or {}).values()]:
        if entry and entry.get('source') == 'evaluated':
            costs[key] += backend.evaluation_cost(entry['purpose'])
    if record.get('control'):
        costs['end'] += run_cost(backend, record['control'])
    for run in record['runs']:
        image_cost = _image_cost(backend, run)
        reached = run.get('stopped_at') or steps[-1]
        for name, begin, end in zip(names[1:-1], [0] + list(steps), steps):
            if begin < reached:
                costs[name] += (backend.train_images(run['options'], min(end, reached)) - backend.train_images(run['options'], begin)) * image_cost
        for e in run['evaluations']:
            stage = names[1 + next(i for i, step in enumerate(steps) if e['step'] <= backend.evaluation_step(step))]
            costs[stage] += e.get('samples', backend.evaluation_samples('select')) * backend.sample_cost('select')
    return costs


def _stage_of(job: str, duration: int) -> str:
    """The stage a job of a round belongs to, from its path inside the round directory."""
    rung = re.fullmatch(r'.+\.to(\d+)', job) or re.fullmatch(r'race/race-(\d+)-n\d+', job)
    if job.startswith(('reference-samples', 'reference-evaluation')):
        return 'reference'
    if job.startswith('report-'):
        return 'report'
    if rung and int(rung.group(1)) != duration:
        return f'rung {rung.group(1)}'
    return 'end'


def _start_times(path) -> list:
    """The UTC start times a job's `.starts` file lists (one line per start: a requeued job starts again)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [datetime.datetime.strptime(line.split()[0], '%Y-%m-%dT%H:%M:%SZ').replace(tzinfo=datetime.timezone.utc).timestamp()
                for line in f if line.strip()]


def stage_times(workdir, record, duration) -> list:
    """Per stage of the round (reference, each rung, end, report, in that order): {'stage', 'jobs', 'job_seconds',
    'wall_seconds' from the first job's start to the last one's end}, read from the jobs' own files."""
    stages = {}
    round_dir = os.path.join(workdir, record['dir'])
    for status_path in glob.glob(os.path.join(round_dir, '**', '*.status'), recursive=True):
        path = status_path[:-len('.status')]
        status, stamps = manifest.read_json(status_path), _start_times(f'{path}.starts')
        if not status or not stamps:
            continue
        stage = stages.setdefault(_stage_of(os.path.relpath(path, round_dir), duration), dict(jobs=0, job_seconds=0,
                                                                                         first=stamps[0], last=0.0))
        stage['jobs'] += 1
        stage['job_seconds'] += status['wall_seconds']
        stage['first'] = min(stage['first'], stamps[0])
        stage['last'] = max(stage['last'], stamps[-1] + status['wall_seconds'])
    order = lambda name: (name != 'reference', name == 'end', name == 'report', int(name.split()[-1]) if name.startswith('rung') else 0)  # noqa: E731
    return [dict(stage=name, jobs=stages[name]['jobs'], job_seconds=stages[name]['job_seconds'],
                 wall_seconds=stages[name]['last'] - stages[name]['first']) for name in sorted(stages, key=order)]
