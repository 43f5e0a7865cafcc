"""Guidance-free sampling throughput: var_ext.sampler.sample(cfg=0) against upstream's
VAR.autoregressive_infer_cfg(cfg=0) on the same randomly initialised model, interleaved in one run.

    python benchmarks/sampler_speed.py                       # CPU-sized defaults
    python benchmarks/sampler_speed.py --depth 16 --batch 64 # VAR-d16 on a GPU

Upstream always runs the unconditional half of the batch, even at cfg=0, and always decodes to images.
"tokens" times token generation only (upstream's final VQVAE decode is stubbed out for that row);
"images" includes the decode on both sides.
"""

import argparse
import statistics
import time
import unittest.mock

import torch

from var_bench_models import add_size_options, describe, random_models
from var_ext import sampler
from var_ext.options import add_amp_option, autocast


def timed(fn, device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_options(parser, depth=6, batch=8)
    add_amp_option(parser)
    return parser


def measure(args) -> dict:
    """Seconds (medians) of ours and upstream's guidance-free sampler, tokens only and with the decode."""
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    cfg, vae, var = random_models(args, device)
    var.eval()
    labels = torch.arange(args.batch, device=device) % cfg.num_classes
    amp = autocast(device, args.amp)
    no_decode = unittest.mock.patch.object(vae, 'fhat_to_img', lambda f_hat: f_hat)   # only inside this benchmark
    runs = {
        ('tokens', 'ours'): lambda: sampler.sample(var, labels, cfg=0),
        ('tokens', 'upstream'): lambda: var.autoregressive_infer_cfg(B=args.batch, label_B=labels, cfg=0),
        ('images', 'ours'): lambda: sampler.sample(var, labels, cfg=0, decode=True),
        ('images', 'upstream'): lambda: var.autoregressive_infer_cfg(B=args.batch, label_B=labels, cfg=0),
    }
    times = {key: [] for key in runs}
    with torch.no_grad(), amp:
        for repeat in range(args.repeats + 1):            # the first round warms up and is discarded
            for key, fn in runs.items():
                if key == ('tokens', 'upstream'):
                    with no_decode:
                        seconds = timed(fn, device)
                else:
                    seconds = timed(fn, device)
                if repeat:
                    times[key].append(seconds)
    return dict(device=describe(device), depth=args.depth, params_m=sum(p.numel() for p in var.parameters()) / 1e6,
                batch=args.batch, amp=args.amp, repeats=args.repeats, tokens_per_batch=args.batch * sum(pn * pn for pn in cfg.patch_nums),
                seconds={f'{what} {who}': statistics.median(t) for (what, who), t in times.items()})


def main(argv=None):
    args = parser().parse_args(argv)
    r = measure(args)
    print(f'device: {r["device"]}; VAR depth {args.depth} ({r["params_m"]:.1f}M params), '
          f'batch {args.batch}, patch_nums {args.patch_nums}, median of {args.repeats}')
    for what in ('tokens', 'images'):
        ours, theirs = r['seconds'][f'{what} ours'], r['seconds'][f'{what} upstream']
        print(f'{what:>6}: ours {r["tokens_per_batch"] / ours:10.1f} tokens/s ({ours:.3f} s)   upstream cfg=0 '
              f'{r["tokens_per_batch"] / theirs:10.1f} tokens/s ({theirs:.3f} s)   speed-up {theirs / ours:.2f}x')


if __name__ == '__main__':
    main()
