"""Class-balanced sampling from a VAR checkpoint: PNGs plus the .npz that OpenAI's evaluator reads.

    torchrun --nproc_per_node=8 -m var_ext.generate --net runs/d16-round1/var-ddo-best.pth --depth 16 \\
        --vae vae_ch160v4096z32.pth --per-class 50 --cfg 0 --outdir samples/d16-ddo-free

Seed s (s = --seed-offset ... + num_classes * per_class - 1) is drawn with its own generator and class
s % num_classes, so the set is exactly class-balanced and each image depends only on its seed: ranks split
the seeds, and an interrupted run is resumed by rerunning the command (existing PNGs are kept). When all
images exist, rank 0 writes `samples_NxHxWx3.npz` with `arr_0` (uint8 NHWC, in seed order) and `arr_1`
(labels), the layout of guided-diffusion's sampler and evaluator.

`--classes 0,5-9` keeps only the seeds of those classes (--per-class each): to look at a checkpoint without
sampling all 1000 classes. They are the same seeds, hence the same images, as in the full set.

Guidance-free is `--cfg 0`. Other values use upstream's ramped CFG, t = cfg * si / (num_scales - 1); at the
pinned upstream commit `--cfg 1.0` is guided (NVlabs/DDO's README calls its `--cfg 1.0` guidance-free).
VAR's released FIDs use `--top-k 900 --top-p 0.96`; the DDO paper reports its models without them.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import PIL.Image
from tqdm import tqdm

from ddo_patch.distributed import barrier, run_entry_point
from ddo_patch.errors import DDOPatchError, exit_on_user_error
from ddo_patch.files import write_atomic
from ddo_patch.seeds import balanced_labels, parse_seeds
from var_ext import models
from var_ext.evaluator import generate_balanced
from var_ext.options import add_amp_option, add_model_options, autocast, init_distributed, load_pretrained


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m var_ext.generate', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p, '--net', 'VAR state dict to sample (e.g. var_d16.pth, or var-ddo-best.pth of a round)')
    g = p.add_argument_group('sampling')
    g.add_argument('--outdir', metavar='DIR', required=True, help='where the PNGs (images/) and the .npz go')
    g.add_argument('--per-class', metavar='INT', type=int, default=50, help='images per class (default: %(default)s, i.e. 50k for ImageNet)')
    g.add_argument('--classes', metavar='LIST', help='only these classes, e.g. 0,5-9 (default: all)')
    g.add_argument('--cfg', metavar='FLOAT', type=float, default=0.0, help='0 = guidance-free; else upstream\'s ramped CFG scale (default: %(default)s)')
    g.add_argument('--top-k', metavar='INT', type=int, default=0, help='keep the k most likely tokens, 0 = off (default: %(default)s)')
    g.add_argument('--top-p', metavar='FLOAT', type=float, default=0.0, help='nucleus mass to keep, 0 = off (default: %(default)s)')
    g.add_argument('--batch', metavar='INT', type=int, default=64, help='images per batch and GPU (default: %(default)s)')
    g.add_argument('--seed-offset', metavar='INT', type=int, default=0, help='first seed (default: %(default)s)')
    add_amp_option(g)
    g.add_argument('--no-npz', action='store_true', help='write PNGs only')
    return p.parse_args(argv)


def validate(args):
    if args.per_class < 1 or args.batch < 1:
        raise DDOPatchError('--per-class and --batch must be >= 1')
    if args.cfg < 0:
        raise DDOPatchError(f'--cfg must be >= 0 (0 = guidance-free), got {args.cfg}')
    if args.top_k < 0 or not 0 <= args.top_p < 1:
        raise DDOPatchError(f'need --top-k >= 0 and 0 <= --top-p < 1, got {args.top_k} and {args.top_p}')


def sampled_seeds(args, num_classes: int) -> list:
    """The seeds to sample: --per-class of every class, or only of --classes (the same seeds as in the full set)."""
    seeds = range(args.seed_offset, args.seed_offset + args.per_class * num_classes)
    if args.classes is None:
        return list(seeds)
    try:
        classes = set(parse_seeds(args.classes))
    except DDOPatchError:
        raise DDOPatchError(f'bad class list --classes "{args.classes}"; write e.g. 0,5-9') from None
    outside = sorted(c for c in classes if not 0 <= c < num_classes)
    if outside:
        raise DDOPatchError(f'--classes {args.classes} names class {outside[0]}, outside [0, {num_classes}); '
                            f'check --classes or --num-classes')
    return [s for s in seeds if s % num_classes in classes]


def png_path(outdir, seed):
    return os.path.join(outdir, 'images', f'{seed:06d}.png')


def write_png(path, image):
    # A killed run never leaves a truncated PNG that resumption would keep.
    write_atomic(path, lambda f: PIL.Image.fromarray(image).save(f, format='png'))


def write_npz(outdir, seeds, num_classes):
    images = np.stack([np.asarray(PIL.Image.open(png_path(outdir, s)).convert('RGB')) for s in tqdm(seeds, desc='npz')])
    path = os.path.join(outdir, f'samples_{"x".join(str(d) for d in images.shape)}.npz')
    write_atomic(path, lambda f: np.savez(f, arr_0=images, arr_1=balanced_labels(seeds, num_classes)))
    return path


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    validate(args)
    models.activate_upstream(args.var_root)
    rank, world_size, device = init_distributed()
    seeds = sampled_seeds(args, args.num_classes)   # a bad --classes fails before a model is built
    model_cfg, _, var = load_pretrained(args, args.net, device)
    os.makedirs(os.path.join(args.outdir, 'images'), exist_ok=True)
    todo = [s for s in seeds[rank::world_size] if not os.path.isfile(png_path(args.outdir, s))]
    if rank == 0:
        done = sum(os.path.isfile(png_path(args.outdir, s)) for s in seeds)
        print(f'[var_ext.generate] {len(seeds)} images, {done} already there; cfg={args.cfg:g} top_k={args.top_k} '
              f'top_p={args.top_p:g}', flush=True)
    with tqdm(total=len(todo), disable=rank != 0, unit='img') as bar:
        for chunk, _, images in generate_balanced(var, todo, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, batch=args.batch,
                                         amp_ctx=autocast(device, args.amp), progress=bar):
            for seed, image in zip(chunk, images):
                write_png(png_path(args.outdir, seed), image)
    barrier()
    if rank == 0 and not args.no_npz:
        print(f'[var_ext.generate] wrote {write_npz(args.outdir, seeds, model_cfg.num_classes)}', flush=True)
    barrier()


if __name__ == '__main__':
    run_entry_point(main)
