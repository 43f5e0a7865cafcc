"""Class-balanced reference samples from an EDM2 snapshot, written as an EDM2 data set for `--fake`.

    torchrun --standalone --nproc_per_node=8 -m edm2_ext.generate --net=ref.pkl --seeds=0-49999 --outdir=fake.zip

Upstream's EDM sampler (`generate_images.edm_sampler`) and per-seed noise (`StackedRandomGenerator`)
are used unchanged; the label of seed s is class s % num_classes (`ddo_patch.seeds.balanced_labels`),
so any seed range of a multiple of num_classes is exactly balanced, whatever the number of processes.
Rank r takes seeds r, r + world, ... of the list.

Pixel models store uint8 PNGs; latent models store the sampler's final-space latents as float32 .npy
(no decode/encode round trip, so DDO sees exactly the reference model's samples). Files are written
atomically and existing ones are skipped, so an interrupted run is resumed by rerunning it. A `.zip`
--outdir is assembled from `<outdir>.partial/` once every seed is done.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile

import click
import numpy as np
import torch
import tqdm

from ddo_patch import upstream
from ddo_patch.distributed import barrier, device_for_this_rank, run_entry_point
from ddo_patch.errors import exit_on_user_error
from ddo_patch.files import write_atomic
from ddo_patch.seeds import balanced_labels
from edm2_ext import options


def sample_name(seed: int, latent: bool) -> str:
    return f'{seed // 1000 * 1000:08d}/img{seed:08d}.' + ('npy' if latent else 'png')


def warn_if_unbalanced(seeds, label_dim):
    from torch_utils import distributed as dist
    if label_dim > 0 and len(seeds) % label_dim:
        dist.print0(f'warning: {len(seeds)} seeds are not a multiple of the {label_dim} classes; '
                    f'the classes will be only nearly balanced (the paper found balance crucial)')


def one_hot_labels(seeds, label_dim, device):
    """Class-balanced one-hot labels (None for an unconditional net)."""
    if label_dim == 0:
        return None
    return torch.eye(label_dim, device=device)[torch.as_tensor(balanced_labels(seeds, label_dim), device=device)]


@torch.no_grad()
def sample_latents(net, seeds, device, **sampler_kwargs) -> torch.Tensor:
    """Final-space samples for `seeds` with upstream's EDM sampler and per-seed noise."""
    from generate_images import StackedRandomGenerator, edm_sampler
    rnd = StackedRandomGenerator(device, seeds)
    noise = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    labels = one_hot_labels(seeds, net.label_dim, device)
    return edm_sampler(net, noise, labels, randn_like=rnd.randn_like, **sampler_kwargs)


def rank_batches(seeds, rank, world, batch):
    mine = list(seeds)[rank::world]
    return [mine[i:i + batch] for i in range(0, len(mine), batch)]


def _save_sample(path, sample, latent):
    if latent:
        write_atomic(path, lambda f: np.save(f, sample.astype(np.float32)))
    else:
        import PIL.Image
        write_atomic(path, lambda f: PIL.Image.fromarray(sample.transpose(1, 2, 0), 'RGB').save(f, format='png'))


def _finish(staging, seeds, label_dim, latent, outdir):
    """Write dataset.json (upstream's layout: [[file, class], ...]) and, for a .zip, pack the folder."""
    labels = balanced_labels(seeds, label_dim).tolist() if label_dim > 0 else None
    meta = {'labels': [[sample_name(s, latent), c] for s, c in zip(seeds, labels)] if labels is not None else None}
    write_atomic(os.path.join(staging, 'dataset.json'), lambda f: f.write(json.dumps(meta).encode()))
    if staging == outdir:
        return

    def pack(f):
        with zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as z:
            for name in [sample_name(s, latent) for s in seeds] + ['dataset.json']:
                z.write(os.path.join(staging, name), name)
    write_atomic(outdir, pack)
    shutil.rmtree(staging)


def generate_dataset(net_path, outdir, seeds, batch, device, **sampler_kwargs):
    """Write the samples of this rank's seeds (skipping finished ones); rank 0 then finishes the data set."""
    from torch_utils import distributed as dist
    from training.encoders import StandardRGBEncoder
    from edm2_ext.network import load_snapshot

    is_zip = outdir.lower().endswith('.zip')
    if is_zip and os.path.isfile(outdir):
        dist.print0(f'{outdir} is complete; nothing to do.')
        return
    snapshot = load_snapshot(net_path)
    net = snapshot['ema'].eval().requires_grad_(False).to(device)
    encoder = snapshot.get('encoder') or StandardRGBEncoder()
    latent = not isinstance(encoder, StandardRGBEncoder)
    warn_if_unbalanced(seeds, net.label_dim)
    staging = f'{outdir}.partial' if is_zip else outdir
    todo = [[s for s in b if not os.path.isfile(os.path.join(staging, sample_name(s, latent)))]
            for b in rank_batches(seeds, dist.get_rank(), dist.get_world_size(), batch)]
    todo = [b for b in todo if b]
    dist.print0(f'{len(seeds)} {"latents" if latent else "images"} for {net_path} -> {outdir}')
    for batch_seeds in tqdm.tqdm(todo, unit='batch', disable=dist.get_rank() != 0):
        out = sample_latents(net, batch_seeds, device, **sampler_kwargs)
        out = out if latent else encoder.decode(out)
        for seed, sample in zip(batch_seeds, out.cpu().numpy()):
            _save_sample(os.path.join(staging, sample_name(seed, latent)), sample, latent)
    barrier()
    if dist.get_rank() == 0:
        _finish(staging, seeds, net.label_dim, latent, outdir)
    barrier()


@click.command(context_settings=dict(help_option_names=['-h', '--help'], max_content_width=110, show_default=True))
@click.option('--net', 'net_path', metavar='PKL|URL', required=True, help='EDM2 network snapshot to sample (the DDO reference).')
@click.option('--outdir', metavar='ZIP|DIR', required=True, help='EDM2 data set to write; a .zip is packed at the end (an existing .zip is kept as is).')
@click.option('--seeds', metavar='LIST', type=options.SEEDS, default='0-49999', help='Seeds, e.g. 0-49999; seed s gets class s % classes.')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, help='Samples per process per sampler call.')
@click.option('--steps', 'num_steps', metavar='INT', type=click.IntRange(min=2), default=32, help='EDM sampler steps (2*steps-1 evaluations).')
@click.option('--sigma-min', 'sigma_min', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.002, help='Lowest noise level.')
@click.option('--sigma-max', 'sigma_max', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=80.0, help='Highest noise level.')
@click.option('--rho', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7.0, help='Time step exponent.')
@options.edm2_root
def cmdline(net_path, outdir, seeds, batch, edm2_root, **sampler_kwargs):
    """Generate class-balanced reference samples (an EDM2 data set) for DDO's --fake; rerun to resume."""
    upstream.activate('edm2', edm2_root)
    from edm2_ext.platform import init_distributed
    device = device_for_this_rank()
    init_distributed(device)
    generate_dataset(net_path, outdir, seeds, batch, device, **sampler_kwargs)


if __name__ == '__main__':
    run_entry_point(exit_on_user_error(cmdline))
