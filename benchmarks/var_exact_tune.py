"""Choosing DDO's hyperparameters for benchmarks/var_exact.py, on seeds and pyramids that report nothing.

    python benchmarks/var_exact_tune.py --outdir runs/var-exact             # after (or instead of) var_exact.py's stages 1-2
    python benchmarks/var_exact_tune.py --outdir runs/var-exact --only a1.5_b1_lr1.5e-4,control_lr1.5e-4

Each candidate is one round of `python -m var_ext.train` from var_exact.py's MLE student with training seed 0 (the
benchmark reports seeds 1-3), its best checkpoint selected as the benchmark selects (teacher NLL of guidance-free
samples on the selection seeds), then scored on the tuning seeds (30,000,000 onwards) and the tuning half of the held-out
pyramids, paired against the student on the same seeds and pyramids. The grid holds the matched control (MLE with the same
recipe, VAR's 10% label dropout) at the learning rates DDO uses, today's regime (alpha 1.5-3, beta 0.25-1, lr 1/20-1/60
of the pretraining peak) and the paper's (large alpha, small beta, lr 1/100-1/600 of the peak). Results are cached per
candidate in OUT/tune/; the table goes to OUT/var_exact_tune.md and .json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import var_exact as bench  # noqa: E402  (the benchmark: its world, student and measures)

from ddo_patch.files import write_atomic  # noqa: E402
from var_ext import exact, models  # noqa: E402

ITERATIONS, BATCH, EVAL_EVERY = 80, 512, 8


def candidate(name, objective='ddo', alpha=1.0, beta=1.0, lr=1.5e-4, label_drop=0.5):
    return name, dict(objective=objective, alpha=alpha, beta=beta, lr=lr, label_drop=label_drop)


GRID = dict([
    candidate('control_lr5e-4', 'mle', lr=5e-4, label_drop=0.1),
    candidate('control_lr1.5e-4', 'mle', lr=1.5e-4, label_drop=0.1),
    candidate('control_lr5e-5', 'mle', lr=5e-5, label_drop=0.1),
    candidate('a1_b1_lr1.5e-4', alpha=1, beta=1, lr=1.5e-4),
    candidate('a1.5_b1_lr1.5e-4', alpha=1.5, beta=1, lr=1.5e-4),
    candidate('a1.5_b1_lr5e-4', alpha=1.5, beta=1, lr=5e-4),
    candidate('a3_b1_lr5e-5', alpha=3, beta=1, lr=5e-5),
    candidate('a3_b0.25_lr5e-5', alpha=3, beta=0.25, lr=5e-5),
    candidate('a10_b0.1_lr1.5e-5', alpha=10, beta=0.1, lr=1.5e-5),
    candidate('a20_b0.02_lr5e-6', alpha=20, beta=0.02, lr=5e-6),
    candidate('a50_b0.02_lr5e-5', alpha=50, beta=0.02, lr=5e-5),
    candidate('a50_b0.02_lr5e-6', alpha=50, beta=0.02, lr=5e-6),
])


def train(out, world_dir, world, size, student, name, spec) -> str:
    """One round from the student; the path of its best checkpoint (by the selection seeds)."""
    run_dir = os.path.join(out, 'tune', name)
    if os.path.isfile(os.path.join(run_dir, 'done')):
        return os.path.join(run_dir, 'var-ddo-best.pth')
    options = dict(bench.model_options(world), vae=os.path.join(world_dir, exact.VAE), dataset='var_ext.exact:training_set',
                   metric='var_ext.exact:teacher_nll', amp='fp32', eval_cfg=0, select_cfg=0, eval_samples=size['select'],
                   eval_batch=500, eval_every=EVAL_EVERY, iterations=ITERATIONS, global_batch=BATCH, lr=spec['lr'],
                   ddo_alpha=spec['alpha'], ddo_beta=spec['beta'], label_drop=spec['label_drop'], objective=spec['objective'],
                   workers=0, seed=0, outdir=run_dir, ref=student)
    argv = [sys.executable, '-m', 'var_ext.train'] + [a for k, v in options.items() for a in ('--' + k.replace('_', '-'), str(v))]
    env = dict(os.environ, OMP_NUM_THREADS='1', **{exact.ENV: world_dir})
    os.makedirs(run_dir, exist_ok=True)
    with open(run_dir + '.log', 'a') as f:
        if subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode:
            sys.exit(f'var_ext.train failed; see {run_dir}.log')
    open(os.path.join(run_dir, 'done'), 'w').close()
    return os.path.join(run_dir, 'var-ddo-best.pth')


def score(out, world_dir, world, size, student, name, spec) -> dict:
    """Train the candidate, then its best checkpoint against the student on the tuning seeds and half (paired)."""
    best = train(out, world_dir, world, size, student, name, spec)
    seeds, tune = list(range(bench.TUNING_SEEDS, bench.TUNING_SEEDS + size['report'])), bench.heldout_half(world_dir, 'tune')
    with open(os.path.join(out, 'tune', name, 'metrics.jsonl')) as f:
        selection = [json.loads(line) for line in f]
    mine = bench.per_sample(world_dir, best, world.student_depth, 0, seeds, tune)
    theirs = bench.per_sample(world_dir, student, world.student_depth, 0, seeds, tune)
    return dict(spec=spec, best_iteration=min(selection, key=lambda m: (m['score'], m['iteration']))['iteration'],
                selection={m['iteration']: m['score'] for m in selection},
                measures={m: bench.mean_se(v) for m, v in bench.measures(mine).items()}, vs_student=bench.paired(mine, theirs))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--outdir', required=True, help='var_exact.py\'s work directory (its world and student are reused).')
    parser.add_argument('--only', help='comma-separated candidate names (default: the whole grid)')
    parser.add_argument('--jobs', type=int, default=2, help='candidates trained at once (one core each)')
    args = parser.parse_args(argv)
    models.activate_upstream()
    torch.set_num_threads(1)
    out, size = os.path.abspath(args.outdir), bench.SIZES['full']
    world, world_dir = size['world'], os.path.join(out, 'world')
    names = args.only.split(',') if args.only else list(GRID)
    unknown = sorted(set(names) - set(GRID))
    if unknown:
        sys.exit(f'--only: unknown {", ".join(unknown)}; choose from {", ".join(GRID)}')
    t0, cache = time.time(), bench.Cache(os.path.join(out, 'scores.json'))
    pool = concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), multiprocessing.get_context('spawn'), initializer=bench.init_worker)
    with pool:
        student, _ = bench.student_and_curve(out, world, world_dir, size, cache, pool)
        bench.log(f'tuning {len(names)} candidates, {ITERATIONS} iterations of {BATCH} from the student, training seed 0')
        results = cache.fill(pool, {f'tune {name} {json.dumps(GRID[name], sort_keys=True)}':
                                    (score, out, world_dir, world, size, student, name, GRID[name]) for name in names})
    rows = [dict(name=name, **results[f'tune {name} {json.dumps(GRID[name], sort_keys=True)}']) for name in names]
    write_atomic(os.path.join(out, 'var_exact_tune.json'), lambda f: f.write(json.dumps(rows, indent=1).encode()))
    lines = ['| candidate | objective | alpha | beta | lr | best iteration (selection) | precision vs student | '
             'recall NLL vs student | KL(q \\|\\| p) vs student | KL(p \\|\\| q) vs student |', '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        s, d = r['spec'], r['vs_student']
        ddo = s['objective'] == 'ddo'
        lines.append(f'| {r["name"]} | {s["objective"]} | {s["alpha"] if ddo else "-"} | {s["beta"] if ddo else "-"} | {s["lr"]:g} | '
                     f'{r["best_iteration"]} | ' + ' | '.join(f'{d[m]["mean"]:+.2f} +- {d[m]["se"]:.2f}'
                                                            for m in ('precision', 'recall', 'kl_model_data', 'kl_data_model')) + ' |')
    text = '\n'.join(lines) + f'\n\nTuning seeds {bench.TUNING_SEEDS}+ ({size["report"]} samples), tuning half of the held-out pyramids; ' \
                              'paired differences against the MLE student (mean +- standard error).\n'
    with open(os.path.join(out, 'var_exact_tune.md'), 'w') as f:
        f.write(text)
    print(text)
    bench.log(f'done in {time.time() - t0:.0f} s')


if __name__ == '__main__':
    main()
