"""Full grid vs successive halving (vs halving + carry-over) on the digits benchmark: same model, grid, seeds.

    pip install -e '.[digits]' && ddo-patch fetch edm2
    python benchmarks/sweep_policies.py --outdir runs/digits     # the digits.py work directory; rerun to resume

Uses stages 1-2 of benchmarks/digits.py in the same --outdir (data, classifier, the 416Ki MLE model; made here
when missing, reused when there), then runs three rounds of `ddo-patch rounds run` per policy, each in
OUT/sweep-POLICY, on one 4 x 3 (alpha, beta) grid evaluated every 1Ki images on the selection seeds:
  grid            every point runs the whole round (the paper's sweep)
  halving         rungs at 1Ki and 2Ki images keep the better quarter (12 -> 3 -> 1 points)
  halving+carry   the same, and rounds 2-3 sweep only the neighbours of the last choice (at most 3 x 3)
Each policy's cost is the manifest's (MLE-image equivalents: training images, evaluation and reference samples).
Each policy's round-3 model, and the MLE model, are then scored on two disjoint report-size seed sets, disjoint
from selection: the spread between the two sets is the metric's own noise. Writes OUT/sweep_policies.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits as bench  # noqa: E402  (the sibling benchmark: its data, pretraining, evaluator and round runner)

from ddo_patch.files import write_atomic  # noqa: E402

# The policies compare what DDO's sweep spends: the config's matched control is left out.
GRID = {'sweep.alpha': '[0.5, 1, 2, 4]', 'sweep.beta': '[0.03, 0.1, 0.3]', 'run.eval_every': '"1Ki"', 'train.checkpoint': '"1Ki"',
        'control.objective': None, 'control.start': None}
HALVING = {'sweep.policy': '"halving"', 'sweep.rungs': '["1Ki", "2Ki"]', 'sweep.keep': '0.25'}
POLICIES = {'grid': GRID, 'halving': dict(GRID, **HALVING), 'halving+carry': dict(GRID, **HALVING, **{'sweep.carry': 'true'})}
REPORT_FIRST = (100_000, 200_000)   # two disjoint report-size seed sets, as digits.py's report and noise sets


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--outdir', required=True, help='The digits.py work directory (its stages 1-2 are reused); rerun to resume.')
    parser.add_argument('--policies', default=','.join(POLICIES), help='Comma-separated subset of %(default)s.')
    parser.add_argument('--select-seeds', type=int, default=500, help='Samples that select (rungs, snapshots).')
    parser.add_argument('--report-seeds', type=int, default=5000, help='Samples per report seed set (two disjoint sets).')
    args = parser.parse_args()
    names = args.policies.split(',')
    unknown = sorted(set(names) - set(POLICIES))
    if unknown:
        sys.exit(f'--policies: unknown {", ".join(unknown)}; choose from {", ".join(POLICIES)}')
    out, size, t0 = os.path.abspath(args.outdir), dict(bench.SIZES['full']), time.time()
    os.makedirs(out, exist_ok=True)
    bench.log('data and classifier; the MLE model (benchmarks/digits.py stages 1-2)')
    bench.digits.make_digits(os.path.join(out, 'data'))
    pretrained = bench.mle(out, size, os.path.join(out, 'pretrain'), size['duration'], 'pretrain.log')
    size['config'] = dict(size['config'], pretraining_images=f'"{size["duration"]}Ki"')

    manifests, walls = {}, {}
    for name in names:
        bench.log(f'policy {name}: 3 rounds (OUT/sweep-{name}.log)')
        start = time.time()
        manifests[name] = bench.rounds(out, size, pretrained, f'0-{args.select_seeds - 1}',
                                       POLICIES[name], f'sweep-{name}')
        walls[name] = time.time() - start   # a resumed policy counts only this invocation
        for record in manifests[name]['rounds']:
            bench.log(f'    round {record["round"]}: {len(record["runs"])} points, chosen {record["chosen"]["run"]} '
                      f'(selection {record["chosen"]["score"]:.3f}), cost {record["cost"]["mle_equivalents"]:.4g}')

    ev, cache = bench.Evaluator(out, size['steps']), bench.Cache(os.path.join(out, 'scores.json'))
    rows = []
    models = {'MLE (round 0)': pretrained, **{name: bench.chosen_models(out, manifests[name], pretrained, f'sweep-{name}')[-1][1] for name in names}}
    for name, path in models.items():
        fids = [cache.get(f'{os.path.relpath(path, out)} 1 seeds {first} report {args.report_seeds}',
                          lambda p=path, f=first: ev.evaluate(p, bench.seed_list(f, args.report_seeds)))['fid'] for first in REPORT_FIRST]
        manifest = manifests.get(name)
        rounds = manifest['rounds'] if manifest else []
        rows.append(dict(policy=name, fid_sets=fids, fid_mean=float(np.mean(fids)),
                         cost=sum(r['cost']['mle_equivalents'] for r in rounds) if rounds else None,
                         train_images=sum(r['cost']['train_images'] for r in rounds) if rounds else None,
                         points=[len(r['runs']) for r in rounds],
                         chosen=[dict(round=r['round'], run=r['chosen']['run'], selection=r['chosen']['score']) for r in rounds],
                         stopped=[[s for rung in r.get('rungs') or [] for s in rung['stopped']] for r in rounds],
                         wall_seconds_this_invocation=walls.get(name)))
        bench.log(f'    {name}: FID {fids[0]:.3f} / {fids[1]:.3f} on two {args.report_seeds}-seed sets')
    grid = next((r for r in rows if r['policy'] == 'grid'), None)
    result = dict(rows=rows, report_samples=args.report_seeds, select_samples=args.select_seeds,
                  grid=POLICIES['grid'], halving=HALVING, wall_seconds=time.time() - t0)
    write_atomic(os.path.join(out, 'sweep_policies.json'), lambda f: f.write(json.dumps(result, indent=2).encode()))
    write_report(out, rows, grid, args.report_seeds)
    bench.log(f'done in {time.time() - t0:.0f} s: {out}/sweep_policies.md, .json, .png')


def write_report(out, rows, grid, report):
    lines = [f'| policy | points per round | chosen (selection FID) | FID, report seed sets A / B ({report} each) | '
             'cost (MLE-image eq.) | vs grid | training images |', '|---|---|---|---|---|---|---|']
    for row in rows:
        cost = '-' if row['cost'] is None else f'{row["cost"]:.4g}'
        ratio = f'{100 * row["cost"] / grid["cost"]:.0f}%' if grid and row['cost'] is not None else '-'
        chosen = ', '.join(f'{c["run"]} ({c["selection"]:.2f})' for c in row['chosen']) or '-'
        images = '-' if row['train_images'] is None else f'{row["train_images"] // 1024}Ki'
        lines.append(f'| {row["policy"]} | {"/".join(map(str, row["points"])) or "-"} | {chosen} | '
                     f'{row["fid_sets"][0]:.3f} / {row["fid_sets"][1]:.3f} | {cost} | {ratio} | {images} |')
    with open(os.path.join(out, 'sweep_policies.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    plot(os.path.join(out, 'sweep_policies.png'), rows)


def plot(path, rows):
    """Report FID (both seed sets) against what each policy spent."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=90)
    for i, row in enumerate(rows):
        x = row['cost'] or 0
        ax.plot([x, x], row['fid_sets'], 'o-', color=f'C{i}', label=row['policy'])
    ax.set(xlabel='cost of 3 rounds (MLE-image equivalents; 0 = the MLE model)', ylabel='report FID (two seed sets)')
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == '__main__':
    main()
