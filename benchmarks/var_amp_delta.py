"""What mixed precision does to DDO's log-ratio for VAR: delta = log p_theta - log p_ref (issue 10, item 5).

    OMP_NUM_THREADS=2 python benchmarks/var_amp_delta.py [--depth 16 --batch 4 --threads 2]

DDO for VAR (Eq. 13) is a function of delta = log p_theta(x) - log p_ref(x), a difference of two sums of
680 token log-probabilities that are each about -680 * (a few nats) while delta itself is small: the
trained model starts at the reference (delta = 0) and stays near it. Upstream VAR trains and samples
under autocast (`--fp16 1|2`: fp16 or bf16); `var_ext.train` runs both forwards inside upstream's
`AmpOptimizer.amp_ctx` (`--amp`), the log-softmax in fp32 (`ddo_patch.losses.sequence_log_likelihood`).

Measured here, on the CPU (torch's CPU autocast takes both fp16 and bf16), with upstream's architecture at
VAR-d16 size (depth 16, width 1024, 1000 classes, V = 4096) over the full 680-token pyramid
(patch_nums 1,2,3,4,5,6,8,10,13,16), on pyramids the reference samples guidance-free (DDO's fake half):

- identical weights (theta a copy of the reference): delta must be exactly 0 in every precision (asserted);
- theta = ref + eps * rms(w) * N(0, 1) per tensor, eps in --eps (relative size of the perturbation): the
  error of delta under autocast against the fp32 delta, relative to std(delta) over the batch (the
  spread DDO's sigmoid sees), and the absolute error times beta = 0.02 (what reaches the sigmoid).

Random weights, at a trained model's scales: upstream's `init_weights` starts every block at the identity
(its AdaLN gammas are 1e-5), where autocast would have nothing to round. Here the class embeddings are
N(0, 1), every AdaLN projection N(0, 1/width) (gammas, scales and shifts of order 0.5) and the head N(0,
(--logit-std)^2 / width), so that the blocks and the head matter; the printed NLL/token says how peaked
the conditionals are (log 4096 = 8.3 nats is uniform). The VQVAE is used only to embed the token pyramid
(its quantiser), so its width does not change the result (--vae-ch 32 by default, for memory).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import time

import torch
from var_bench_models import add_size_options, random_models

from ddo_patch.losses import sequence_log_likelihood
from var_ext import sampler

PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def trained_scales(var, logit_std: float, seed: int = 0) -> None:
    """Redraw the weights that upstream's init leaves near zero (see the module docstring), in place."""
    g = torch.Generator().manual_seed(seed)
    width = var.C
    with torch.no_grad():
        var.class_emb.weight.copy_(torch.randn(var.class_emb.weight.shape, generator=g))
        for module in var.modules():
            if hasattr(module, 'ada_lin'):   # AdaLNSelfAttn and AdaLNBeforeHead: Sequential(SiLU, Linear)
                lin = module.ada_lin[-1]
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(width))
                lin.bias.zero_()
        var.head.weight.copy_(torch.randn(var.head.weight.shape, generator=g) * logit_std / math.sqrt(width))


def perturbed(ref, eps: float, seed: int):
    """theta = ref + eps * rms(w) * N(0, 1), tensor by tensor: a relative perturbation of size eps."""
    theta = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theta.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (eps * p.pow(2).mean().sqrt()))
    return theta


def autocast(precision: str, device):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@torch.no_grad()
def log_likelihood(var, labels, inputs, targets, precision: str) -> torch.Tensor:
    """log p(x) per sample, the forward under autocast(precision) as var_ext's trainer runs it, the log-softmax in fp32."""
    with autocast(precision, labels.device):
        return sequence_log_likelihood(var(labels, inputs), targets).double()


def teacher_forcing(vae, tokens):
    """(inputs, targets) of VAR's teacher-forced forward for token pyramids given per scale."""
    return vae.quantize.idxBl_to_var_input(tokens), torch.cat(tokens, dim=1)


def identical_weights_give_zero(ref, labels, inputs, targets, precisions) -> dict:
    """delta of a copy of `ref` against `ref` in each precision; asserts it is exactly 0."""
    twin = copy.deepcopy(ref)
    deltas = {}
    for precision in precisions:
        delta = log_likelihood(twin, labels, inputs, targets, precision) - log_likelihood(ref, labels, inputs, targets, precision)
        assert bool((delta == 0).all()), f'identical weights give delta {delta.tolist()} under {precision}'
        deltas[precision] = delta.abs().max().item()
    return deltas


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_options(parser, depth=16, batch=4, vae_ch=32, timed=False)
    parser.add_argument('--blocks', metavar='INT', type=int, help='keep only the first INT transformer blocks (default: all)')
    parser.add_argument('--eps', metavar='LIST', default='1e-3,1e-2', help='relative weight perturbations (default: %(default)s)')
    parser.add_argument('--logit-std', metavar='FLOAT', type=float, default=3.0, help='spread of the head\'s logits (default: %(default)s)')
    parser.add_argument('--beta', metavar='FLOAT', type=float, default=0.02, help='DDO beta, to show what reaches the sigmoid (default: %(default)s)')
    parser.add_argument('--json', metavar='FILE', help='also write the figures here')
    args = parser.parse_args()
    device = torch.device('cpu')
    cfg, vae, ref = random_models(args, device)
    trained_scales(ref, args.logit_std)
    ref.eval().requires_grad_(False)
    if args.blocks:   # same width and blocks, fewer of them: the rounding error grows with depth, so this understates it
        ref.blocks = ref.blocks[:args.blocks]
    labels = torch.arange(args.batch) * 97 % cfg.num_classes
    began = time.perf_counter()
    tokens = sampler.sample(ref, labels, cfg=0.0, seeds=list(range(args.batch))).tokens
    inputs, targets = teacher_forcing(vae, tokens)
    print(f'VAR depth {len(ref.blocks)} (width {ref.C}, {sum(p.numel() for p in ref.parameters()) / 1e6:.0f}M parameters), '
          f'{targets.shape[1]} tokens, batch {args.batch}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}; '
          f'reference samples drawn in {time.perf_counter() - began:.0f} s', flush=True)

    ref_logp = {}
    for precision in PRECISIONS:
        began = time.perf_counter()
        ref_logp[precision] = log_likelihood(ref, labels, inputs, targets, precision)
        print(f'  log p_ref under {precision}: {time.perf_counter() - began:.0f} s', flush=True)
    nll = -ref_logp['fp32'].mean().item() / targets.shape[1]
    print(f'reference NLL of its own samples: {nll:.2f} nats/token (uniform: {math.log(cfg.vae_vocab):.2f}); error of log p itself, '
          + ', '.join(f'{p} {(ref_logp[p] - ref_logp["fp32"]).abs().max().item():.3g}' for p in PRECISIONS if p != 'fp32') + ' nats (max)', flush=True)

    rows = []
    for i, eps in enumerate(sorted((float(e) for e in args.eps.split(',')), reverse=True)):
        theta = perturbed(ref, eps, seed=1 + i)
        delta = {}
        for precision in PRECISIONS:
            delta[precision] = log_likelihood(theta, labels, inputs, targets, precision) - ref_logp[precision]
        exact = delta['fp32']
        spread = exact.std().item()
        for precision in ('bf16', 'fp16'):
            error = delta[precision] - exact
            rms = error.pow(2).mean().sqrt().item()
            rows.append({'eps': eps, 'precision': precision, 'delta_mean': exact.mean().item(), 'delta_std': spread,
                         'error_mean': error.mean().item(), 'error_std': error.std().item(), 'error_rms': rms,
                         'error_max': error.abs().max().item(), 'error_over_std': rms / spread,
                         'beta_error_max': args.beta * error.abs().max().item()})
            r = rows[-1]
            print(f'eps {eps:g} {precision}: delta mean {r["delta_mean"]:+.4g} std {spread:.4g}; error mean {r["error_mean"]:+.3g} '
                  f'std {r["error_std"]:.3g} rms {rms:.3g} max {r["error_max"]:.3g} nats; rms = {r["error_over_std"]:.3g} std(delta); '
                  f'beta * max error {r["beta_error_max"]:.2g}', flush=True)
        del theta

    zero = identical_weights_give_zero(ref, labels, inputs, targets, PRECISIONS)
    print('identical weights: delta exactly 0 in ' + ', '.join(zero), flush=True)

    print('\n| eps | autocast | delta (fp32): mean | std | error: mean | std | rms | max | rms / std(delta) | beta x max |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f'| {r["eps"]:g} | {r["precision"]} | {r["delta_mean"]:+.4g} | {r["delta_std"]:.4g} | {r["error_mean"]:+.3g} | '
              f'{r["error_std"]:.3g} | {r["error_rms"]:.3g} | {r["error_max"]:.3g} | {r["error_over_std"]:.3g} | {r["beta_error_max"]:.2g} |')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'depth': len(ref.blocks), 'width': ref.C, 'batch': args.batch, 'tokens': targets.shape[1],
                       'nll_per_token': nll, 'identical_weights_max_abs_delta': zero, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
    main()
