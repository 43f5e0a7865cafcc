"""`step_cost.py --backend var`: one DDO step (online reference sampling included) against one upstream
`VARTrainer.train_step` (maximum likelihood) on the same model, batch and optimiser, interleaved in one run.

Both start from the same images: upstream tokenises them inside train_step; the DDO step tokenises them the
same way, samples as many reference sequences guidance-free, then runs target and reference on
cat(real, fake). Printed: seconds per step, their ratio, and the DDO step split into tokenise / generate /
train (forward + backward + optimiser step); peak GPU memory when on CUDA.
"""

import argparse
import statistics
import time
import types

import torch

from var_bench_models import add_size_options, describe, random_models
from var_ext import models
from var_ext.options import add_amp_option
from var_ext.train import AMP_MODES
from var_ext.trainer import build_optimizer, make_trainer


def parser():
    parser = argparse.ArgumentParser(prog='step_cost.py --backend var', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_options(parser, depth=4, batch=8)
    add_amp_option(parser)
    return parser


def measure(args) -> dict:
    """Seconds per step (medians), the DDO step's split, and peak GPU memory (GiB, on CUDA) of both steps."""
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    cfg, vae, var = random_models(args, device)
    ref = models.frozen_copy(var)
    amp = AMP_MODES[args.amp] if device.type == 'cuda' else 0
    opt = build_optimizer(var, lr=4e-6, weight_decay=0.05, grad_clip=2.0, mixed_precision=amp)
    trainer = make_trainer(vae, var, ref, var, opt, alpha=50.0, beta=0.02)
    images = torch.rand(args.batch, 3, cfg.resolution, cfg.resolution, device=device) * 2 - 1
    labels = torch.arange(args.batch, device=device) % cfg.num_classes
    quiet_logger = types.SimpleNamespace(log_iters=set(), update=lambda **kw: None)   # upstream's loggers, silenced

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    def mle_step():
        trainer.base.train_step(it=1, g_it=1, stepping=True, metric_lg=quiet_logger, tb_lg=quiet_logger,
                                inp_B3HW=images, label_B=labels, prog_si=-1, prog_wp_it=1)

    def ddo_step(iteration):
        start = time.perf_counter()
        real = trainer.real_tokens(images)
        sync()
        tokenised = time.perf_counter() - start
        log = trainer.step(labels, real, iteration)
        return tokenised, log['Timing/seconds_generate'], log['Timing/seconds_train']

    mle, ddo, peaks = [], [], {}
    for repeat in range(args.repeats + 1):                    # round 0 warms up and is discarded
        for name in ('mle', 'ddo'):
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            parts = mle_step() if name == 'mle' else ddo_step(repeat)
            sync()
            seconds = time.perf_counter() - start
            if repeat:
                (mle if name == 'mle' else ddo).append((seconds, parts))
            if device.type == 'cuda':
                peaks[name] = torch.cuda.max_memory_allocated() / 2 ** 30
    return dict(device=describe(device), depth=args.depth, params_m=sum(p.numel() for p in var.parameters()) / 1e6,
                batch=args.batch, resolution=cfg.resolution, amp=args.amp, repeats=args.repeats,
                mle_seconds=statistics.median(s for s, _ in mle), ddo_seconds=statistics.median(s for s, _ in ddo),
                ddo_split=dict(zip(('tokenise', 'generate', 'train'), (statistics.median(p[i] for _, p in ddo) for i in range(3)))),
                peak_gib=peaks)


def main(argv=None):
    args = parser().parse_args(argv)
    r = measure(args)
    ddo_s, split = r['ddo_seconds'], r['ddo_split']
    print(f'device: {r["device"]}; VAR depth {args.depth} ({r["params_m"]:.1f}M params), '
          f'batch {args.batch}, {r["resolution"]}px, patch_nums {args.patch_nums}, VQVAE ch {args.vae_ch}, median of {args.repeats}')
    print(f'upstream VARTrainer.train_step (MLE): {r["mle_seconds"]:.3f} s/step')
    print(f'DDO step:                             {ddo_s:.3f} s/step   ratio DDO / MLE = {ddo_s / r["mle_seconds"]:.2f}x')
    print(f'  DDO split: tokenise {split["tokenise"]:.3f} s ({split["tokenise"] / ddo_s:.0%}), generate {split["generate"]:.3f} s '
          f'({split["generate"] / ddo_s:.0%}), train {split["train"]:.3f} s ({split["train"] / ddo_s:.0%})')
    if r['peak_gib']:
        print(f'peak GPU memory: MLE {r["peak_gib"]["mle"]:.2f} GiB, DDO {r["peak_gib"]["ddo"]:.2f} GiB')
