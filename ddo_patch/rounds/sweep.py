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
"""

from __future__ import annotations

import random


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
    image_cost = 1.0 if run.get('objective') == 'mle' else backend.ddo_image_cost
    return run['images'] * image_cost + run_evaluation_samples(backend, run) * backend.sample_cost('select')


def run_evaluation_samples(backend, run) -> int:
    return sum(e.get('samples', backend.evaluation_samples('select')) for e in run['evaluations'])


def round_cost(backend, record) -> dict:
    """What the round spent (its control included): images trained, samples generated, and all of it in MLE-image
    equivalents; with a control, also what the control's run cost alone (its training and evaluations)."""
    evaluations = [e for e in [record['reference_evaluation']] + list((record.get('report') or {}).values())
                   if e and e.get('source') == 'evaluated']
    runs = record['runs'] + ([record['control']] if record.get('control') else [])
    samples = backend.reference_sample_count(record['round']) if record.get('reference_samples') else 0
    return dict(train_images=sum(run['images'] for run in runs),
                evaluation_samples=sum(run_evaluation_samples(backend, run) for run in runs) +
                sum(backend.evaluation_samples(e['purpose']) for e in evaluations),
                reference_samples=samples,
                mle_equivalents=sum(run_cost(backend, run) for run in runs) + samples * backend.sample_cost('reference') +
                sum(backend.evaluation_cost(e['purpose']) for e in evaluations),
                **({'control_mle_equivalents': run_cost(backend, record['control'])} if record.get('control') else {}))
