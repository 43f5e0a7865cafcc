"""Class-balanced FID (and FD_DINOv2) of one EDM2 snapshot or of every snapshot in a run directory.

    torchrun --standalone --nproc_per_node=8 -m edm2_ext.evaluate --net=runs/round01 \\
        --ref=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img64.pkl --dest=runs/round01/fid.json

Samples come from `edm2_ext.generate.sample_latents` (upstream EDM sampler, class of seed s = s % classes),
decoded by the snapshot's encoder, and go through upstream `calculate_metrics` detectors (Inception-v3
for `fid`, DINOv2 for `fd_dinov2`) unless `--detector METRIC=MODULE:CLASS` names another one (any class
with `feature_dim` and `__call__(uint8 NCHW) -> [N, feature_dim]`; the tests use a tiny offline one).
Reference statistics are upstream's format: a pickle {metric: {mu, sigma}} (path or URL).
The JSON at --dest lists every snapshot's metrics and names the best one by the first metric; it is
rewritten after each snapshot, and a rerun with the same settings only evaluates snapshots not in it yet.
"""

from __future__ import annotations

import json
import os

import click
import numpy as np
import torch
import tqdm

from ddo_patch import racing, upstream
from ddo_patch.distributed import device_for_this_rank, run_entry_point
from ddo_patch.errors import DDOPatchError, exit_on_user_error
from ddo_patch.files import write_atomic
from ddo_patch.metrics import frechet_distance
from edm2_ext import options
from edm2_ext.run_files import list_snapshots, snapshot_kimg

UPSTREAM_DETECTORS = {'fid': 'calculate_metrics.InceptionV3Detector', 'fd_dinov2': 'calculate_metrics.DINOv2Detector'}


def parse_detectors(metrics, overrides) -> dict:
    """{metric: 'module:Class' or upstream class name} from --metrics and --detector METRIC=MODULE:CLASS."""
    detectors = {m: UPSTREAM_DETECTORS.get(m) for m in metrics}
    for item in overrides:
        metric, sep, target = item.partition('=')
        if not sep or ':' not in target:
            raise DDOPatchError(f'--detector {item}: write METRIC=MODULE:CLASS, e.g. fid=my_detectors:Inception')
        detectors[metric] = target.replace(':', '.')
    missing = [m for m, d in detectors.items() if d is None]
    if missing:
        raise DDOPatchError(f'no detector for {", ".join(missing)}; upstream offers {", ".join(UPSTREAM_DETECTORS)}, '
                            f'or name one with --detector METRIC=MODULE:CLASS')
    return detectors


def _all_reduce(x):
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(x)
    return x


@torch.no_grad()
def _feature_batches(snapshot_path, detectors, seeds, batch, device, **sampler_kwargs):
    """(seeds, {metric: features [len(seeds), D] float64 on the CPU}) per batch of this rank's share of `seeds`."""
    from torch_utils import distributed as dist
    from training.encoders import StandardRGBEncoder
    from edm2_ext.generate import rank_batches, sample_latents, warn_if_unbalanced
    from edm2_ext.network import load_snapshot
    snapshot = load_snapshot(snapshot_path)
    net = snapshot['ema'].eval().requires_grad_(False).to(device)
    encoder = snapshot.get('encoder') or StandardRGBEncoder()
    encoder.init(device)
    warn_if_unbalanced(seeds, net.label_dim)
    batches = rank_batches(seeds, dist.get_rank(), dist.get_world_size(), batch)
    for batch_seeds in tqdm.tqdm(batches, unit='batch', disable=dist.get_rank() != 0, leave=False):
        images = encoder.decode(sample_latents(net, batch_seeds, device, **sampler_kwargs))
        yield batch_seeds, {metric: detector(images).to(torch.float64).cpu() for metric, detector in detectors.items()}


def sample_feature_statistics(snapshot_path, detectors, seeds, batch, device, **sampler_kwargs) -> dict:
    """{metric: (mu, sigma)} of this snapshot's class-balanced samples, over all ranks."""
    sums = {m: [torch.zeros([d.feature_dim], dtype=torch.float64), torch.zeros([d.feature_dim] * 2, dtype=torch.float64)]
            for m, d in detectors.items()}
    for _, features in _feature_batches(snapshot_path, detectors, seeds, batch, device, **sampler_kwargs):
        for metric, x in features.items():
            sums[metric][0] += x.sum(0)
            sums[metric][1] += x.T @ x
    n = len(seeds)
    stats = {}
    for metric, (total, outer) in sums.items():
        total, outer = _all_reduce(total.to(device)).cpu(), _all_reduce(outer.to(device)).cpu()
        mu = total / n
        stats[metric] = (mu.numpy(), ((outer - torch.outer(mu, mu) * n) / (n - 1)).numpy())
    return stats


def sample_features(snapshot_path, detector, seeds, batch, device, **sampler_kwargs) -> np.ndarray:
    """Per-sample features [len(seeds), D] of this snapshot, in the order of `seeds`, on every rank."""
    mine = {}
    for batch_seeds, features in _feature_batches(snapshot_path, {'x': detector}, seeds, batch, device, **sampler_kwargs):
        mine.update(zip(batch_seeds, features['x'].numpy()))
    if torch.distributed.is_initialized():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, mine)
        mine = {seed: x for part in parts for seed, x in part.items()}
    return np.stack([mine[seed] for seed in seeds])


def _previous_results(dest, settings) -> dict:
    """Rows of an earlier report at `dest` made with the same settings, by snapshot file name."""
    if not os.path.isfile(dest):
        return {}
    with open(dest) as f:
        report = json.load(f)
    return {row['snapshot']: row for row in report.get('results', [])} if report.get('settings') == settings else {}


def _write_json(dest, report):
    write_atomic(dest, lambda f: f.write(json.dumps(report, indent=2).encode()))


def _reference_statistics(ref, metrics) -> dict:
    from calculate_metrics import load_stats
    try:
        ref_stats = load_stats(ref, verbose=False)
    except Exception as err:
        raise DDOPatchError(f'--ref {ref} is not a reference-statistics pickle ({type(err).__name__}: {err})') from None
    absent = [m for m in metrics if m not in ref_stats]
    if absent:
        raise DDOPatchError(f'--ref {ref} has no statistics for {", ".join(absent)} (it has {", ".join(ref_stats)})')
    return ref_stats


def _detectors(names: dict) -> dict:
    import dnnlib
    return {m: dnnlib.util.construct_class_by_name(class_name=name) for m, name in names.items()}


def evaluate(net, ref, dest, metrics, detector_overrides, seeds, batch, device, skip_initial=False, **sampler_kwargs) -> dict:
    """Evaluate every snapshot of `net`, writing `dest` after each one; snapshots already in `dest` with the
    same settings are not evaluated again (rerun while training goes on, or after an interruption)."""
    from torch_utils import distributed as dist
    if len(seeds) < 2:
        raise DDOPatchError('--seeds must give at least two samples')
    detector_names = parse_detectors(metrics, detector_overrides)
    ref_stats = _reference_statistics(ref, metrics)
    snapshots = list_snapshots(net)
    if skip_initial and os.path.isdir(net):
        snapshots = [path for path in snapshots if snapshot_kimg(path) > 0]
        if not snapshots:
            raise DDOPatchError(f'{net} has no snapshot after kimg 0 to evaluate; did its training run?')
    settings = dict(ref=ref, metrics=list(metrics), detectors=detector_names, sampler=sampler_kwargs,
                    seeds=f'{len(seeds)} seeds {seeds[0]}..{seeds[-1]}')
    previous = _previous_results(dest, settings)
    detectors = None
    report = dict(net=net, settings=settings, results=[], best=None)
    for path in snapshots:
        row = previous.get(os.path.basename(path))
        if row is None:
            detectors = detectors or _detectors(detector_names)
            stats = sample_feature_statistics(path, detectors, seeds, batch, device, **sampler_kwargs)
            row = {'snapshot': os.path.basename(path)}
            row.update({m: frechet_distance(*stats[m], ref_stats[m]['mu'], ref_stats[m]['sigma']) for m in metrics})
            dist.print0('  '.join([row['snapshot']] + [f'{m} {row[m]:.4f}' for m in metrics]))
        report['results'].append(row)
        report['best'] = min(report['results'], key=lambda r: r[metrics[0]])
        if dist.get_rank() == 0:
            _write_json(dest, report)
    return report


def race(nets, ref, dest, metric, detector_overrides, seeds, batch, device, store, groups, **sampler_kwargs) -> dict:
    """One level of a race (`ddo_patch.racing`): each snapshot's `metric` on `seeds` (the first n of the selection
    seeds) and without each of `groups` jackknife groups of them (`ddo_patch.racing`), into `dest`. Per-sample features are kept in
    `store`, one file per snapshot, so the next level samples only the seeds it adds; a file made with other
    settings, or for seeds that are not a prefix of these, is made again."""
    from torch_utils import distributed as dist
    detector_names = parse_detectors([metric], detector_overrides)
    ref_stats = _reference_statistics(ref, [metric])[metric]
    settings = dict(ref=ref, metric=metric, detector=detector_names[metric], sampler=sampler_kwargs)
    partition = racing.jackknife_groups(len(seeds), groups)
    os.makedirs(store, exist_ok=True)
    detector, results = None, []
    for path in nets:
        file = os.path.join(store, os.path.normpath(path).replace(os.sep, '__') + '.npz')
        stored = np.load(file, allow_pickle=False) if os.path.isfile(file) else None
        known = np.zeros([0], dtype=np.int64), None
        if stored is not None and json.loads(str(stored['settings'])) == settings:
            count = min(len(stored['seeds']), len(seeds))
            if list(stored['seeds'][:count]) == list(seeds[:count]):
                known = stored['seeds'], stored['features']
        missing = list(seeds[len(known[0]):])
        if missing:
            detector = detector or _detectors(detector_names)[metric]
            new = sample_features(path, detector, missing, batch, device, **sampler_kwargs)
            known = (np.concatenate([known[0], missing]), new if known[1] is None else np.concatenate([known[1], new]))
            if dist.get_rank() == 0:
                write_atomic(file, lambda f, k=known: np.savez(f, seeds=k[0], features=k[1], settings=json.dumps(settings)))
        score, leave_out = racing.frechet_to_reference(known[1][:len(seeds)], ref_stats['mu'], ref_stats['sigma'], partition)
        results.append(dict(snapshot=path, score=score, leave_out=leave_out.tolist(), sampled=len(missing)))
        dist.print0(f'{path}  {metric} {score:.4f} at {len(seeds)} samples')
    report = dict(samples=len(seeds), groups=groups, settings=settings, results=results)
    if dist.get_rank() == 0:
        _write_json(dest, report)
    return report


@click.command(context_settings=dict(help_option_names=['-h', '--help'], max_content_width=110, show_default=True))
@click.option('--net', 'nets', metavar='PKL|DIR', required=True, multiple=True,
              help='A network snapshot, or a run directory: every snapshot in it. With --race-store: snapshots (repeatable).')
@click.option('--ref', metavar='PKL|URL', required=True, help='Reference statistics of the data set (upstream calculate_metrics ref).')
@click.option('--dest', metavar='JSON', required=True, help='Where to write every result and the best snapshot; rerun to add new snapshots.')
@click.option('--metrics', metavar='LIST', default='fid', help='Comma-separated metrics; the first one picks the best snapshot.')
@click.option('--detector', 'detector_overrides', metavar='METRIC=MODULE:CLASS', multiple=True, help='Use this feature detector for METRIC (repeatable).')
@click.option('--seeds', metavar='LIST', type=options.SEEDS, default='0-49999', help='Sampling seeds; class of seed s = s % classes.')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, help='Samples per process per sampler call.')
@click.option('--steps', 'num_steps', metavar='INT', type=click.IntRange(min=2), default=32, help='EDM sampler steps.')
@click.option('--skip-initial', is_flag=True, help='In a run directory, skip the kimg-0 snapshot (its starting point, evaluated elsewhere).')
@click.option('--race-store', metavar='DIR', default=None,
              help='One level of a race (ddo_patch.racing): score each --net snapshot, also without each jackknife group, keeping per-sample features here.')
@click.option('--groups', metavar='INT', type=click.IntRange(min=2), default=racing.DEFAULT_GROUPS, help='Jackknife groups of a race level.')
@options.edm2_root
def cmdline(nets, ref, dest, metrics, detector_overrides, seeds, batch, num_steps, skip_initial, race_store, groups, edm2_root):
    """Class-balanced FID of a snapshot or of every snapshot of a run; writes all results and the best one."""
    metrics = [m.strip() for m in metrics.split(',') if m.strip()]
    if race_store is None and len(nets) > 1:
        raise DDOPatchError('--net names one snapshot or run directory (several only for a race level, with --race-store)')
    if race_store is not None and len(metrics) != 1:
        raise DDOPatchError(f'a race level scores one metric; give --metrics with one name, got {",".join(metrics)}')
    upstream.activate('edm2', edm2_root)
    from torch_utils import distributed as dist
    from edm2_ext.platform import init_distributed
    device = device_for_this_rank()
    init_distributed(device)
    if race_store is not None:
        race(nets, ref, dest, metrics[0], detector_overrides, seeds, batch, device, race_store, groups, num_steps=num_steps)
        return
    report = evaluate(nets[0], ref, dest, metrics, detector_overrides, seeds, batch, device, skip_initial=skip_initial,
                      num_steps=num_steps)
    dist.print0(f'best: {report["best"]["snapshot"]} -> {dest}')


if __name__ == '__main__':
    run_entry_point(exit_on_user_error(cmdline))
