"""How much precision does DDO's delta = err_ref - err_theta need? (issue 11, item 9)

    python benchmarks/ddo_precision.py                    # EDM2-S at 64x64, random weights, batch 8, on the CPU

DDO learns from delta = err_ref - err_theta (Eq. 44), a difference of two large per-sample errors of
two nearly equal networks: near the reference (where DDO lives: theta starts there and moves little in
a round) the difference is small and rounding in either network's forward may swamp it. This measures,
on the CPU, the error of delta computed by `DiffusionDDOLoss` (one sigma and noise per sample, shared)
under reduced precision against fp32, relative to the spread of the fp32 delta over the batch:

    relative error = rms_i(delta_i[low precision] - delta_i[fp32]) / std_i(delta_i[fp32])

- bf16: the inputs and the output of every convolution and matrix product rounded to bf16 (8-bit
  significand, round to nearest even), fp32 in between: the casts autocast makes at the ops it runs in
  bf16 on a GPU. Real autocast also keeps the elementwise ops between them in bf16, so this is a lower
  bound of its error; `--autocast` adds a column with `torch.autocast('cpu', dtype=torch.bfloat16)`
  itself, only worth it on a CPU with native bf16 (without, bf16 convolutions run ~200x slower than fp32);
- tf32: fp32 everywhere, but the two multiplicands of every convolution and matrix product rounded to
  TF32's 10-bit mantissa first, products accumulated in fp32: what a GPU's TF32 tensor cores compute
  (`torch.backends.cuda.matmul.allow_tf32`, which upstream EDM2 turns off).

theta: `random` (its own initialisation, independent of ref), `ref+1e-3` and `ref+1e-2` (every weight
tensor of ref plus eps * its std * standard normal noise). Random weights are upstream's initialisation
with its zero-initialised output and embedding gains set to 1 (at 0 every network is D(x) = c_skip x and
delta = 0). The figure of merit is the near-reference rows:
a relative error of order 1 means the sign and ranking of delta, hence the discriminator and the gradient
weights sigmoid(beta * delta), are noise. Both networks run in eval mode, in fp32 weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy

import torch

from ddo_patch import upstream
from ddo_patch.losses import DiffusionDDOLoss
from ddo_patch.precision import RoundedMatmuls, round_to_bf16, round_to_tf32

PRECISIONS = {
    'fp32': contextlib.nullcontext,
    'bf16': lambda: RoundedMatmuls(round_to_bf16, every_input=True, output=True),
    'tf32': lambda: RoundedMatmuls(round_to_tf32),
    'bf16-autocast': lambda: torch.autocast('cpu', dtype=torch.bfloat16),
}


def deltas(net, ref, images, labels, precision: str, seed: int = 0, P_mean=-0.8, P_std=1.6) -> torch.Tensor:
    """The batch's deltas from `DiffusionDDOLoss` (one forward of each net over the batch, no grad) under
    `precision`: the first half of `images` as the real, the second as the fake samples (the loss draws one
    sigma and noise per pair), the same draws for every precision (seeded)."""
    loss = DiffusionDDOLoss(P_mean=P_mean, P_std=P_std, single_forward=True)
    real, fake = images.chunk(2)
    real_labels, fake_labels = (None, None) if labels is None else labels.chunk(2)
    torch.manual_seed(seed)
    with torch.no_grad(), PRECISIONS[precision]():
        terms = loss.terms(net, ref, real, fake, real_labels, fake_labels)
    return torch.cat([terms.delta_real, terms.delta_fake])


class Memo(torch.nn.Module):
    """`net` whose output is computed once per `key`: the reference sees the same inputs (seeded sigma and
    noise) for every theta at one precision, so each precision runs it once."""

    def __init__(self, net):
        super().__init__()
        self.net, self.key, self.outputs = net, None, {}

    def forward(self, *args, **kwargs):
        if self.key not in self.outputs:
            self.outputs[self.key] = self.net(*args, **kwargs)
        return self.outputs[self.key]


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """rms over the batch of (approx - exact), over the batch std of exact."""
    return float((approx - exact).square().mean().sqrt() / exact.std())


def perturbed(net, eps: float, seed: int = 1):
    """A copy of `net` with every parameter p + eps * std(p) * N(0, 1)."""
    out = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (eps * float(p.std()) if p.numel() > 1 else eps))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--channels', type=int, default=192, help='model_channels (EDM2-S: 192)')
    parser.add_argument('--res', type=int, default=64, help='image resolution')
    parser.add_argument('--batch', type=int, default=8, help='samples: half real, half fake (even)')
    parser.add_argument('--threads', type=int, default=0, help='CPU threads (0 = torch default)')
    parser.add_argument('--autocast', action='store_true', help='also real bf16 autocast (needs a CPU with native bf16)')
    parser.add_argument('--edm2-root', default=None, help='NVlabs/edm2 checkout (default: $EDM2_ROOT or the cache)')
    args = parser.parse_args(argv)
    upstream.activate('edm2', args.edm2_root)
    from training.networks_edm2 import Precond
    if args.threads:
        torch.set_num_threads(args.threads)

    def network(seed):
        torch.manual_seed(seed)
        net = Precond(args.res, 3, 1000, model_channels=args.channels, use_fp16=False).eval().requires_grad_(False)
        for name, param in net.named_parameters():
            if name.endswith('_gain'):   # EDM2 initialises its output and embedding gains to 0 (D(x) = c_skip x)
                param.fill_(1.0)
        return net

    ref = network(0)
    gen = torch.Generator().manual_seed(2)
    images = torch.randn([args.batch, 3, args.res, args.res], generator=gen) * 0.5
    labels = torch.eye(1000)[torch.randint(1000, [args.batch], generator=gen)]
    thetas = {'random': network(1), 'ref+1e-3': perturbed(ref, 1e-3), 'ref+1e-2': perturbed(ref, 1e-2)}
    print(f'EDM2 Precond, {args.res}x{args.res}, channels {args.channels}, random weights, batch {args.batch}; '
          f'relative error of delta = rms(delta - delta_fp32) / std(delta_fp32)')
    columns = ['bf16', 'tf32'] + (['bf16-autocast'] if args.autocast else [])
    print(f'{"theta":10s} {"std(delta_fp32)":>16s} ' + ' '.join(f'{c:>13s}' for c in columns))
    memo = Memo(ref)
    for name, theta in thetas.items():
        results = {}
        for precision in ['fp32'] + columns:
            memo.key = precision
            results[precision] = deltas(theta, memo, images, labels, precision)
        exact = results['fp32']
        print(f'{name:10s} {float(exact.std()):16.4g} ' + ' '.join(f'{relative_error(results[c], exact):13.3g}' for c in columns), flush=True)


if __name__ == '__main__':
    main()
