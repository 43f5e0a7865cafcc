"""Sweep and evaluation policies on the digits benchmark, replicated: the full grid, successive halving, halving
with racing, and a random subset of the grid at the cost of halving + racing; 3 rounds x 3 replicates each.

    pip install -e '.[digits]' && ddo-patch fetch edm2
    python benchmarks/sweep_policies.py --outdir runs/digits     # the digits.py work directory; rerun to resume

Uses stages 1-2 of benchmarks/digits.py in the same --outdir (data, classifier, the 416Ki MLE model; made here
when missing, reused when there). Every policy runs `ddo-patch rounds run` on one 3 x 3 (alpha, beta) grid, 4Ki
images per point and round, a snapshot every 1Ki scored on 500 selection seeds (0-499), in OUT/policies/POLICY-sSEED:
  grid            every point runs the whole round, every snapshot scored on all 500 seeds (the paper's sweep)
  halving         rungs at 1Ki and 2Ki keep the best third (9 -> 3 -> 1 points)
  halving+racing  the same, each snapshot first scored on 50 seeds, then 150, then all 500 while it could still be
                  the round's best (evaluate.policy = "racing", threshold 0.05, 10 jackknife groups; ddo_patch.racing)
  random          `count` points drawn from the grid per round (sweep.policy = "random"), each run in full, count
                  chosen so that its cost matches halving + racing's (mean over its replicates)
A replicate (1, 2, 3) sets the training seed (data order, noise), the reference-sample seeds and the random draw.
Each (policy, replicate)'s round-3 model is scored on 5000 report seeds (100000-104999, disjoint from selection)
against the training split, and in 300-sample chunks against the 300 held-out images; cost is the manifests'
(MLE-image equivalents), time the jobs' own seconds (`times`, per stage). The levels and the threshold were set
before any run and not tuned. Calibration: the grouped jackknife's standard error of FID, and of the difference of
two models, against the spread over 10 disjoint seed sets (seeds 300000 on), at each race level (and a bootstrap's).
Writes OUT/sweep_policies.{md,json,png}.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits as bench  # noqa: E402  (the sibling benchmark: its data, pretraining, evaluator and round runner)

from ddo_patch import racing  # noqa: E402
from ddo_patch.files import write_atomic  # noqa: E402
from ddo_patch.metrics import feature_statistics, frechet_distance  # noqa: E402

SELECT = 500
RACE_SAMPLES = [50, 150]
# The policies compare what DDO's sweep spends: the config's matched control is left out.
GRID = {'sweep.alpha': '[0.5, 1, 2]', 'sweep.beta': '[0.03, 0.1, 0.3]', 'run.eval_every': '"1Ki"', 'train.checkpoint': '"1Ki"',
        'control.objective': None, 'control.start': None}
HALVING = dict(GRID, **{'sweep.policy': '"halving"', 'sweep.rungs': '["1Ki", "2Ki"]', 'sweep.keep': '0.333'})
RACING = dict(HALVING, **{'evaluate.policy': '"racing"', 'evaluate.race_samples': str(RACE_SAMPLES), 'evaluate.race_threshold': '0.05'})
POLICIES = {'grid': GRID, 'halving': HALVING, 'halving+racing': RACING, 'random': None}   # random's count: from halving+racing
REPLICATES = (1, 2, 3)
REPORT_FIRST, REPORT = 100_000, 5000
CALIBRATION_FIRST, CALIBRATION_SETS = 300_000, 10


def policy_values(name, seed, count=None) -> dict:
    values = dict(GRID, **{'sweep.policy': '"random"', 'sweep.count': str(count), 'sweep.seed': str(seed)}) if name == 'random' \
        else POLICIES[name]
    return dict(values, **bench.replicate_values(seed))


def run_policy(out, size, pretrained, name, seed, count=None) -> dict:
    start = time.time()
    workdir = f'policies/{name}-s{seed}'
    manifest = bench.rounds(out, size, pretrained, f'0-{SELECT - 1}', policy_values(name, seed, count), workdir)
    rounds = manifest['rounds']
    bench.log(f'    {name} s{seed}: ' + '; '.join(f'round {r["round"]} {len(r["runs"])} points, chose {r["chosen"]["run"]} '
                                                  f'({r["chosen"]["score"]:.3f}), cost {r["cost"]["mle_equivalents"]:.4g}' for r in rounds))
    return dict(policy=name, seed=seed, workdir=workdir, manifest=manifest, elapsed_this_invocation=time.time() - start)


# The same decisions at the paper's proportions (ImageNet-64, appendix C): an evaluation (50k samples x 63 network
# evaluations / 3) costs 3.2x the 2^17 DDO images between two snapshots (here: 500 x 31 / 3 against 1Ki x 2.5, 2.0x),
# and a round's 50k reference samples cost 1.5 % of one sweep point's round (here: 1000 x 63 / 3, 68 %).
PAPER_EVALUATION_SCALE = (50_000 * 63 / 3 / (2 ** 17 * 2.5)) / (SELECT * 31 / 3 / (1024 * 2.5))
PAPER_REFERENCE_SCALE = (50_000 * 63 / 3 / (6400 * 1024 * 2.5 + 50 * 50_000 * 63 / 3)) / (1000 * 63 / 3 / (4096 * 2.5 + 4 * SELECT * 31 / 3))


def paper_cost(manifest) -> float:
    """A policy's cost with its evaluations and reference samples reweighted to the paper's proportions."""
    total = 0.0
    for r in manifest['rounds']:
        images = sum(run['images'] for run in r['runs']) * 2.5
        samples = sum(e.get('samples', SELECT) for run in r['runs'] for e in run['evaluations']) * 31 / 3
        total += images + samples * PAPER_EVALUATION_SCALE + r['cost']['stages']['reference'] * PAPER_REFERENCE_SCALE
    return total


def sweep_cost(manifest) -> float:
    """A policy's cost without the reference's samples and evaluation, which every policy pays alike."""
    return sum(r['cost']['mle_equivalents'] - r['cost']['stages']['reference'] for r in manifest['rounds'])


# What one grid point costs in a round: 4Ki DDO images at 2.5 and 4 evaluations on every selection seed, each sample
# 2 x 16 - 1 network evaluations at a third of an image (configs/digits-edm2.toml: evaluate.steps = 16).
FULL_POINT_COST = 4096 * 2.5 + 4 * SELECT * (2 * 16 - 1) / 3


def summary(values) -> dict:
    values = np.asarray(values, dtype=float)
    return dict(mean=float(values.mean()), sd=float(values.std(ddof=1)) if len(values) > 1 else 0.0, values=values.tolist())


def calibration(ev, models) -> list:
    """At each race level n: the spread of FID over disjoint seed sets of n against the grouped jackknife's standard
    error (what racing uses) and a bootstrap's (200 resamples with replacement, for comparison), for each model and
    for the differences of consecutive models (paired: the same seeds)."""
    from ddo_patch.metrics import feature_statistics, frechet_distance
    rows, names = [], list(models)
    for n in RACE_SAMPLES + [SELECT]:
        features = {name: [ev.detector(ev.images(path, bench.seed_list(CALIBRATION_FIRST + i * n, n))).numpy()
                           for i in range(CALIBRATION_SETS)] for name, path in models.items()}
        groups, resamples = racing.jackknife_groups(n, racing.DEFAULT_GROUPS), np.random.default_rng(n).integers(0, n, size=(200, n))
        scored = {name: [(*racing.frechet_to_reference(x, *ev.real_stats, groups),
                          np.array([frechet_distance(*feature_statistics(x[i]), *ev.real_stats) for i in resamples])) for x in sets]
                  for name, sets in features.items()}

        def spread(pairs):   # [(score, leave_out, bootstrap)] per set -> the three spreads
            return dict(fid=summary([p[0] for p in pairs]),
                        jackknife_se=float(np.mean([np.sqrt((len(p[1]) - 1) / len(p[1]) * np.square(p[1] - p[1].mean()).sum()) for p in pairs])),
                        bootstrap_sd=float(np.mean([p[2].std() for p in pairs])))
        row = dict(samples=n, **{name: spread(scored[name]) for name in names})
        for a, b in zip(names[1:], names):
            row[f'{a} - {b}'] = spread([(x[0] - y[0], x[1] - y[1], x[2] - y[2]) for x, y in zip(scored[a], scored[b])])
        rows.append(row)
        bench.log(f'    calibration at {n}: ' + ', '.join(f'{k}: sd over sets {v["fid"]["sd"]:.3f}, jackknife {v["jackknife_se"]:.3f}, '
                                                       f'bootstrap {v["bootstrap_sd"]:.3f}' for k, v in row.items() if k != 'samples'))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--outdir', required=True, help='The digits.py work directory (its stages 1-2 are reused); rerun to resume.')
    parser.add_argument('--jobs', type=int, default=2, help='(policy, replicate) chains that run at once (one core each).')
    args = parser.parse_args()
    out, t0 = os.path.abspath(args.outdir), time.time()
    os.makedirs(os.path.join(out, 'policies'), exist_ok=True)
    size, pretrained = bench.stages_1_2(out)

    bench.log(f'3 rounds per policy and replicate, {args.jobs} at a time (OUT/policies/*.log)')
    results = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        # the racing chains first (random's cost is theirs), the grid's (the longest) beside them
        order = [(name, seed) for seed in REPLICATES for name in ('halving+racing', 'grid')] + [('halving', s) for s in REPLICATES]
        futures = {pool.submit(run_policy, out, size, pretrained, name, seed): (name, seed) for name, seed in order}
        count = None
        while futures:
            done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                results[futures.pop(future)] = future.result()
            if count is None and all(('halving+racing', s) in results for s in REPLICATES):
                racing_cost = np.mean([sweep_cost(results[('halving+racing', s)]['manifest']) for s in REPLICATES]) / 3
                count = max(1, round(racing_cost / FULL_POINT_COST))
                bench.log(f'    random subset: {count} point(s) per round (halving + racing spent {racing_cost:.4g} a round '
                          f'besides the reference)')
                futures.update({pool.submit(run_policy, out, size, pretrained, 'random', s, count): ('random', s) for s in REPLICATES})

    bench.log(f'report: each chain\'s round-3 model on {REPORT} report seeds')
    ev, cache = bench.Evaluator(out, size['steps']), bench.Cache(os.path.join(out, 'scores.json'))
    score = bench.report_scorer(out, ev, cache, REPORT_FIRST, REPORT)

    mle = score(pretrained)
    rows = []
    for (name, seed), result in sorted(results.items(), key=lambda item: (list(POLICIES).index(item[0][0]), item[0][1])):
        manifest = result['manifest']
        final = bench.chosen_models(out, manifest, pretrained, result['workdir'])[-1][1]
        scores = score(final)
        rows.append(dict(policy=name, seed=seed, fid=scores['fid'], heldout_fid=scores['heldout']['fid']['mean'],
                         cost=sum(r['cost']['mle_equivalents'] for r in manifest['rounds']), sweep_cost=sweep_cost(manifest),
                         paper_cost=paper_cost(manifest),
                         job_seconds=sum(t['job_seconds'] for r in manifest['rounds'] for t in r['times']),
                         jobs=sum(t['jobs'] for r in manifest['rounds'] for t in r['times']),
                         points=[len(r['runs']) for r in manifest['rounds']],
                         chosen=[dict(run=r['chosen']['run'], step=r['chosen']['step'], selection=r['chosen']['score']) for r in manifest['rounds']],
                         samples=sum(r['cost']['evaluation_samples'] for r in manifest['rounds'])))
        bench.log(f'    {name} s{seed}: FID {rows[-1]["fid"]:.3f} (held-out {rows[-1]["heldout_fid"]:.2f}), cost {rows[-1]["cost"]:.4g}, '
                  f'{rows[-1]["job_seconds"]} job seconds')
    noise_fid = cache.get(f'report {bench.sample_key(out, dict(path=pretrained))} seeds 200000 {REPORT}',
                          lambda: ev.evaluate(pretrained, bench.seed_list(200_000, REPORT)))['fid']

    bench.log('calibration of racing\'s uncertainty against disjoint seed sets')
    chain = bench.chosen_models(out, results[('grid', 1)]['manifest'], pretrained, results[('grid', 1)]['workdir'])
    models = {'MLE': pretrained, 'grid s1 round 1': chain[0][1], 'grid s1 round 2': chain[1][1]}
    calib = cache.get(f'racing calibration jackknife {" ".join(os.path.relpath(p, out) for p in models.values())} {CALIBRATION_SETS}',
                      lambda: calibration(ev, models))

    policies = summarise(rows)
    result = dict(rows=rows, policies=policies, mle=dict(fid=mle['fid'], heldout_fid=mle['heldout']['fid']['mean'], noise_fid=noise_fid),
                  calibration=calib, select_samples=SELECT, race_samples=RACE_SAMPLES, report_samples=REPORT,
                  random_count=results[('random', 1)]['manifest']['config']['sweep']['count'],
                  real_halves_fid=frechet_distance(*feature_statistics(ev.real[:748]), *feature_statistics(ev.real[748:1496])),
                  wall_seconds_this_invocation=time.time() - t0)
    write_atomic(os.path.join(out, 'sweep_policies.json'), lambda f: f.write(json.dumps(result, indent=2).encode()))
    write_report(out, result)
    bench.log(f'done in {time.time() - t0:.0f} s: {out}/sweep_policies.md, .json, .png')


def summarise(rows) -> dict:
    grid = [row for row in rows if row['policy'] == 'grid']
    policies = {}
    for name in POLICIES:
        mine = [row for row in rows if row['policy'] == name]
        if not mine:
            continue
        policies[name] = dict(fid=summary([r['fid'] for r in mine]), heldout_fid=summary([r['heldout_fid'] for r in mine]),
                              cost=summary([r['cost'] for r in mine]), job_seconds=summary([r['job_seconds'] for r in mine]),
                              cost_vs_grid=float(np.mean([r['cost'] for r in mine]) / np.mean([r['cost'] for r in grid])) if grid else None,
                              seconds_vs_grid=float(np.mean([r['job_seconds'] for r in mine]) / np.mean([r['job_seconds'] for r in grid])) if grid else None,
                              sweep_cost_vs_grid=float(np.mean([r['sweep_cost'] for r in mine]) / np.mean([r['sweep_cost'] for r in grid])) if grid else None,
                              paper_cost_vs_grid=float(np.mean([r['paper_cost'] for r in mine]) / np.mean([r['paper_cost'] for r in grid])) if grid else None)
    return policies


def write_report(out, result):
    fmt = lambda s: f'{s["mean"]:.3f} ± {s["sd"]:.3f}'  # noqa: E731
    lines = ['| policy | FID vs training (mean ± sd over 3 replicates) | per replicate | FID vs held-out | cost (MLE-image eq., 3 rounds) '
             '| vs grid | without the reference samples, vs grid | at the paper\'s proportions, vs grid | job seconds | vs grid |',
             '|---|---|---|---|---|---|---|---|---|---|']
    mle = result['mle']
    lines.append(f'| MLE (round 0) | {mle["fid"]:.3f} | - | {mle["heldout_fid"]:.2f} | - | - | - | - | - | - |')
    for name, p in result['policies'].items():
        lines.append(f'| {name} | {fmt(p["fid"])} | {" / ".join(f"{v:.3f}" for v in p["fid"]["values"])} | {fmt(p["heldout_fid"])} | '
                     f'{p["cost"]["mean"]:.4g} | {100 * p["cost_vs_grid"]:.0f}% | {100 * p["sweep_cost_vs_grid"]:.0f}% | '
                     f'{100 * p["paper_cost_vs_grid"]:.0f}% | {p["job_seconds"]["mean"]:.0f} | {100 * p["seconds_vs_grid"]:.0f}% |')
    lines += ['', f'Noise: the MLE model on two disjoint {result["report_samples"]}-seed sets: {mle["fid"]:.3f} / {mle["noise_fid"]:.3f}.', '',
              f'| race level (samples) | model or paired difference | FID: mean, sd over {CALIBRATION_SETS} disjoint seed sets | '
              'jackknife standard error (mean) | / sd | bootstrap sd (mean) | / sd |', '|---|---|---|---|---|---|---|']
    for row in result['calibration']:
        for key, v in row.items():
            if key != 'samples':
                lines.append(f'| {row["samples"]} | {key} | {v["fid"]["mean"]:.2f}, {v["fid"]["sd"]:.3f} | {v["jackknife_se"]:.3f} | '
                             f'{v["jackknife_se"] / v["fid"]["sd"]:.2f} | {v["bootstrap_sd"]:.3f} | {v["bootstrap_sd"] / v["fid"]["sd"]:.2f} |')
    with open(os.path.join(out, 'sweep_policies.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    plot(os.path.join(out, 'sweep_policies.png'), result)


def plot(path, result):
    """Report FID (training split, and held-out) against what each replicate of each policy spent."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    for ax, key, label in zip(axes, ('fid', 'heldout_fid'), ('FID vs training split', 'FID vs held-out (300-sample chunks)')):
        for i, name in enumerate(result['policies']):
            mine = [r for r in result['rows'] if r['policy'] == name]
            ax.plot([r['cost'] for r in mine], [r[key] for r in mine], 'o', color=f'C{i}', label=name, alpha=0.8)
            ax.errorbar([np.mean([r['cost'] for r in mine])], [np.mean([r[key] for r in mine])],
                        yerr=[np.std([r[key] for r in mine], ddof=1)], color=f'C{i}', marker='_', markersize=14, capsize=3)
        ax.axhline(result['mle'][key], color='grey', ls=':', label='MLE model')
        ax.set(xscale='log', xlabel='cost of 3 rounds (MLE-image equivalents)', ylabel=label)
    axes[0].legend(fontsize=7)
    fig.suptitle('digits: 3 rounds x 3 replicates per policy (dots), mean ± sd (bars)', fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == '__main__':
    main()
