"""A round-manager backend whose "training" follows a scripted law, for testing the manager's decisions fast.

A snapshot is a JSON file holding its own score; evaluating it reads the score. A sweep point's run writes
one snapshot every eval_every steps, scored by `LAWS[law](reference score, alpha, beta, step)`, and its
evaluations into `evaluations.json`. Jobs run `python -m scripted_backend ...` (tests/ on PYTHONPATH).
Racing: a snapshot scored on n of the 10 samples scores its own score + 1/n (FID's bias), and its scores without
each jackknife group are drawn around that: an error all snapshots share at a level (they share its seeds) with a
jackknife standard error of RACE_SD / sqrt(n), and a tenth of that of their own, drawn per snapshot.
"""

import json
import os
import sys
import time
import zlib

import numpy as np

from ddo_patch.rounds.backend import Backend, Command


def _alpha_3_crashes(reference, alpha, beta, step):
    if alpha == 3:
        raise RuntimeError('scripted crash: alpha 3')
    return LAWS['alpha_helps'](reference, alpha, beta, step)


LAWS = {
    'never': lambda reference, alpha, beta, step: reference + 0.5 * step,          # every step is worse
    'alpha_helps': lambda reference, alpha, beta, step: reference - 0.1 * alpha * step,
    'alpha_3_crashes': _alpha_3_crashes,   # alpha_helps, but the job of a point with alpha 3 fails
}
MLE_LAW = lambda reference, step: reference - 0.05 * step   # noqa: E731 (the control: better than its start, by little)
NOISE = 0.01   # what an evaluation on the noise seeds adds to a snapshot's score
RACE_SD = 0.2


class ScriptedBackend(Backend):
    name = 'scripted'
    train_options = ('law', 'seconds')   # the scoring law, and seconds per step (to have a job to interrupt)
    evaluate_options = ('metric', 'report_seeds', 'noise_seeds')   # seeds are names here: evaluation_seeds returns them
    races = True

    def evaluation(self, snapshot, dest, purpose, options):
        return Command('scripted_backend', ['evaluate', snapshot, dest, purpose])

    def evaluation_seeds(self, purpose):
        return purpose

    def read_evaluation(self, path):
        with open(path) as f:
            return json.load(f)['score']

    def run_commands(self, round_idx, run_dir, reference, fake, alpha, beta, options, stop_at=None, objective='ddo',
                     evaluate=True):
        cfg = self.cfg
        law = options.get('law', 'never') if objective == 'ddo' else objective
        return [Command('scripted_backend', ['train', run_dir, reference, alpha, beta, stop_at or cfg.duration, cfg.eval_every,
                                             law, options.get('seconds', 0)])]

    def snapshots(self, run_dir, up_to):
        steps = sorted(int(name[len('snapshot-'):-len('.json')]) for name in os.listdir(run_dir) if name.startswith('snapshot-'))
        return [(step, os.path.join(run_dir, f'snapshot-{step}.json')) for step in steps if step <= up_to]

    def race_evaluation(self, snapshots, samples, dest, store):
        return Command('scripted_backend', ['race', dest, samples, self.cfg.racing['groups'], *snapshots])

    def read_race(self, path):
        with open(path) as f:
            return json.load(f)

    def train_images(self, options, steps):
        return steps

    def evaluation_samples(self, purpose):
        return 10

    def sample_cost(self, kind):
        return 1.0

    def collect(self, run_dir, evaluated=True):
        if not evaluated:
            return dict(evaluations=[], error=None)
        with open(os.path.join(run_dir, 'evaluations.json')) as f:
            evaluations = json.load(f)
        return dict(evaluations=[dict(e, snapshot=os.path.join(run_dir, os.path.basename(e['snapshot']))) for e in evaluations],
                    error=None)


def _score(path):
    with open(path) as f:
        return json.load(f)['score']


def _write(path, obj):
    with open(path, 'w') as f:
        json.dump(obj, f)


def _unit_jackknife_error(noise):
    return noise / np.sqrt((len(noise) - 1) / len(noise) * np.square(noise - noise.mean()).sum())


def _race(dest, samples, groups, snapshots):
    results = {}
    for path in snapshots:
        score = _score(path) + 1 / samples
        shared, own = (_unit_jackknife_error(np.random.default_rng(seed).normal(size=groups))
                       for seed in ([samples], [samples, zlib.crc32(path.encode())]))
        results[path] = dict(score=score, leave_out=(score + (shared + 0.1 * own) * RACE_SD / samples ** 0.5).tolist())
    _write(dest, results)


def main(argv):
    if argv[0] == 'race':
        os.makedirs(os.path.dirname(argv[1]), exist_ok=True)
        _race(argv[1], int(argv[2]), int(argv[3]), argv[4:])
        return
    if argv[0] == 'evaluate':
        _write(argv[2], {'score': _score(argv[1]) + (NOISE if argv[3] == 'noise' else 0)})
        return
    run_dir, reference, alpha, beta, stop_at, eval_every, law, seconds = argv[1:]   # a larger stop_at continues the run
    os.makedirs(run_dir, exist_ok=True)
    start, evaluations = _score(reference), []
    for step in range(int(eval_every), int(stop_at) + 1, int(eval_every)):
        time.sleep(float(seconds))
        snapshot = os.path.join(run_dir, f'snapshot-{step}.json')
        _write(snapshot, {'score': MLE_LAW(start, step) if law == 'mle' else LAWS[law](start, float(alpha), float(beta), step)})
        evaluations.append(dict(step=step, snapshot=snapshot, score=_score(snapshot)))
    _write(os.path.join(run_dir, 'evaluations.json'), evaluations)


if __name__ == '__main__':
    main(sys.argv[1:])
