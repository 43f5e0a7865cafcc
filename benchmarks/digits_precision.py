"""Does DDO keep its gain in TF32, bf16 or fp16? The digits benchmark's DDO rounds under each precision mode.

    pip install -e '.[digits]' && ddo-patch fetch edm2
    python benchmarks/digits_precision.py --outdir runs/digits     # the digits.py work directory; rerun to resume

Uses stages 1-2 of benchmarks/digits.py in the same --outdir (data, classifier, the 416Ki MLE model). Per mode
(`edm2_ext.train --precision`, `ddo_patch.precision`: TF32 emulated on the CPU exactly as tensor cores round,
bf16 and fp16 as real CPU autocast) and replicate (1, 2, 3: the training seed, data order and noise, and the
reference-sample seeds, the same for every mode), `ddo-patch rounds run configs/digits-edm2.toml` with the point
every fp32 replicate chose in round 1 of benchmarks/digits.py (alpha 2, beta 0.1), --rounds rounds, selection on
500 seeds; the last chosen model is scored on 5000 report seeds against the training split and in 300-sample
chunks against the 300 held-out images. The gain of a mode is FID(MLE) - FID(mode), and the fraction it keeps is
its gain over fp32's, per replicate (paired: the same seeds). An op census says which ops of one DDO step CPU
autocast leaves in the low dtype where CUDA's autocast would run them in fp32.
Writes OUT/digits_precision.{md,json}.
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
import digits as bench  # noqa: E402

from ddo_patch.files import write_atomic  # noqa: E402
from ddo_patch.precision import AUTOCAST, MODES  # noqa: E402

POINT = {'sweep.alpha': '[2]', 'sweep.beta': '[0.1]', 'control.objective': None, 'control.start': None}
REPLICATES = (1, 2, 3)
REPORT_FIRST, REPORT = 100_000, 5000
# CUDA autocast's fp32 list (torch.amp docs), the ops of it that EDM2's step calls: on a CPU they run in the dtype given.
CUDA_FP32_OPS = {'exp', 'log', 'pow', 'sum', 'softmax', 'log_softmax', 'norm', 'linalg_vector_norm', 'rsqrt', 'reciprocal',
                 'mse_loss', 'cumsum', 'prod', 'layer_norm', 'group_norm'}


def run_mode(out, size, pretrained, mode, seed, rounds) -> dict:
    values = dict(POINT, **bench.replicate_values(seed), rounds=str(rounds), **{'train.precision': f'"{mode}"'})
    name = f'precision/{mode}-s{seed}'
    start = time.time()
    manifest = bench.rounds(out, size, pretrained, '0-499', values, name)
    bench.log(f'    {mode} s{seed}: ' + '; '.join(f'round {r["round"]} chose {r["chosen"]["run"]} step {r["chosen"]["step"]} '
                                                  f'({r["chosen"]["score"]:.3f})' for r in manifest['rounds']) +
              f' ({time.time() - start:.0f} s)')
    return dict(mode=mode, seed=seed, name=name, manifest=manifest,
                train_seconds=sum(run['wall_seconds'] for r in manifest['rounds'] for run in r['runs']))


def op_census(out, pretrained) -> dict:
    """{mode: sorted names of the ops of one DDO step (forward and backward) that produce a low-dtype tensor on
    the CPU although CUDA's autocast would run them in fp32}."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ddo_patch import upstream
    upstream.activate('edm2')
    from ddo_patch.losses import DiffusionDDOLoss
    from ddo_patch.precision import Precision
    from edm2_ext.datasets import open_dataset
    from edm2_ext.loss import ddo_loss
    from edm2_ext.network import fp32_without_dropout, load_snapshot

    class Census(TorchDispatchMode):
        def __init__(self, dtype):
            super().__init__()
            self.dtype, self.ops = dtype, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__.rstrip('_')
            outputs = result if isinstance(result, (tuple, list)) else [result]
            if name in CUDA_FP32_OPS and any(isinstance(o, torch.Tensor) and o.dtype == self.dtype for o in outputs):
                self.ops.add(name)
            return result

    net = fp32_without_dropout(load_snapshot(pretrained)['ema']).train().requires_grad_(True)
    ref = fp32_without_dropout(load_snapshot(pretrained)['ema']).eval().requires_grad_(False)
    data = open_dataset(os.path.join(out, 'data', 'train.zip'), '--data', use_labels=True)
    images = torch.stack([torch.as_tensor(data[i][0]) for i in range(16)]).float() / 127.5 - 1
    labels = torch.stack([torch.as_tensor(data[i][1]) for i in range(16)])
    census = {}
    for mode, dtype in AUTOCAST.items():
        torch.manual_seed(0)
        spy = Census(dtype)
        with spy:
            with Precision(mode, 'cpu').forward():
                loss, _ = ddo_loss(DiffusionDDOLoss(P_mean=-0.8, P_std=1.6, alpha=2, beta=0.1, single_forward=True), net, ref,
                                   images[:8], labels[:8], images[8:], labels[8:])
            loss.sum().backward()
        census[mode] = sorted(spy.ops)
    return census


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--outdir', required=True, help='The digits.py work directory (its stages 1-2 are reused); rerun to resume.')
    parser.add_argument('--modes', default=','.join(MODES), help='Comma-separated subset of %(default)s (fp32 is always run).')
    parser.add_argument('--rounds', type=int, default=1, help='DDO rounds per mode and replicate.')
    parser.add_argument('--jobs', type=int, default=2, help='Chains that run at once (one core each).')
    args = parser.parse_args()
    modes = ['fp32'] + [m for m in args.modes.split(',') if m != 'fp32']
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        sys.exit(f'--modes: unknown {", ".join(unknown)}; choose from {", ".join(MODES)}')
    out, t0 = os.path.abspath(args.outdir), time.time()
    os.environ['DDO_PATCH_PRECISION_STUDY'] = '1'   # edm2_ext.train offers every mode, not only those measured safe
    os.makedirs(os.path.join(out, 'precision'), exist_ok=True)
    size, pretrained = bench.stages_1_2(out)

    bench.log(f'{args.rounds} DDO round(s) per mode and replicate, {args.jobs} at a time (OUT/precision/*.log)')
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_mode, out, size, pretrained, mode, seed, args.rounds)
                   for mode in sorted(modes, key=lambda m: -('fp16' == m)) for seed in REPLICATES]   # the slowest first
        results = [future.result() for future in futures]

    bench.log(f'report: each chain\'s last model on {REPORT} report seeds')
    ev, cache = bench.Evaluator(out, size['steps']), bench.Cache(os.path.join(out, 'scores.json'))
    report_score = bench.report_scorer(out, ev, cache, REPORT_FIRST, REPORT)

    def score(path):
        result = report_score(path)
        return dict(fid=result['fid'], heldout_fid=result['heldout']['fid']['mean'])

    mle = score(pretrained)
    rows = []
    for result in results:
        final = bench.chosen_models(out, result['manifest'], pretrained, result['name'])[-1][1]
        rows.append(dict(mode=result['mode'], seed=result['seed'], chosen=final != pretrained, train_seconds=result['train_seconds'],
                         **score(final)))
    by = {(row['mode'], row['seed']): row for row in rows}
    summary = {}
    for mode in modes:
        kept = {key: [(mle[key] - by[(mode, s)][key]) / (mle[key] - by[('fp32', s)][key]) for s in REPLICATES]
                for key in ('fid', 'heldout_fid')}
        summary[mode] = {key: dict(mean=float(np.mean([by[(mode, s)][key] for s in REPLICATES])),
                                   sd=float(np.std([by[(mode, s)][key] for s in REPLICATES], ddof=1)),
                                   kept_mean=float(np.mean(kept[key])), kept_sd=float(np.std(kept[key], ddof=1)),
                                   kept=kept[key]) for key in ('fid', 'heldout_fid')}
        summary[mode]['train_seconds'] = float(np.mean([by[(mode, s)]['train_seconds'] for s in REPLICATES]))
        bench.log(f'    {mode}: FID {summary[mode]["fid"]["mean"]:.3f} ± {summary[mode]["fid"]["sd"]:.3f}, keeps '
                  f'{100 * summary[mode]["fid"]["kept_mean"]:.0f}% ± {100 * summary[mode]["fid"]["kept_sd"]:.0f}% of fp32\'s gain')
    census = cache.get('precision op census', lambda: op_census(out, pretrained))
    result = dict(rows=rows, summary=summary, mle=mle, census=census, rounds=args.rounds, point=POINT,
                  wall_seconds_this_invocation=time.time() - t0)
    write_atomic(os.path.join(out, 'digits_precision.json'), lambda f: f.write(json.dumps(result, indent=2).encode()))
    lines = ['| mode | FID vs training (mean ± sd, 3 replicates) | fp32 gain kept | FID vs held-out | gain kept (held-out) | '
             'per replicate (training split) | training seconds per run (CPU) |', '|---|---|---|---|---|---|---|',
             f'| MLE (start) | {mle["fid"]:.3f} | - | {mle["heldout_fid"]:.2f} | - | - | - |']
    for mode, s in summary.items():
        lines.append(f'| {mode} | {s["fid"]["mean"]:.3f} ± {s["fid"]["sd"]:.3f} | {100 * s["fid"]["kept_mean"]:.0f}% ± '
                     f'{100 * s["fid"]["kept_sd"]:.0f}% | {s["heldout_fid"]["mean"]:.2f} ± {s["heldout_fid"]["sd"]:.2f} | '
                     f'{100 * s["heldout_fid"]["kept_mean"]:.0f}% | ' + ' / '.join(f'{by[(mode, r)]["fid"]:.3f}' for r in REPLICATES) +
                     f' | {s["train_seconds"]:.0f} |')
    lines += ['', 'Ops CPU autocast left in the low dtype that CUDA autocast runs in fp32: ' +
              '; '.join(f'{mode}: {", ".join(ops) or "none"}' for mode, ops in census.items())]
    with open(os.path.join(out, 'digits_precision.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    bench.log(f'done in {time.time() - t0:.0f} s: {out}/digits_precision.md, .json')


if __name__ == '__main__':
    main()
