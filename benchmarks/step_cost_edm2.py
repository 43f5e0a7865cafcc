"""One DDO training step against one upstream `EDM2Loss` step: same EDM2 network, same per-GPU batch.

    python benchmarks/step_cost.py --backend edm2                          # EDM2-S ImageNet-64 on a GPU
    python benchmarks/step_cost.py --backend edm2 --channels 32 --res 16 --blocks 1 --batch 8 --label-dim 10

A step is zero_grad, loss, backward and Adam's update, in fp32 (DDO trains in fp32; the MLE step uses
the same fp32 net so that only the objective differs). The DDO step is `DiffusionDDOLoss(single_forward=
True)` as `edm2_ext.train` runs it: one training-mode forward/backward of the target over cat(real, fake)
(2B samples) and one no-grad reference forward over the same 2B. Weights are random: cost does not depend
on them. The two steps alternate (`--repeats` times after one warm-up each) and medians are compared.

Memory, both reported per step kind:
- step peak: the most bytes held by tensors allocated during the step (activations, gradients,
  temporaries) above what was resident before it. GPU: torch.cuda.max_memory_allocated minus
  memory_allocated before the step. CPU: the same quantity counted exactly by `ddo_patch.memory.step_peak`,
  which tracks every tensor storage created by an op until it is freed (a separate, untimed pass);
- total peak: step peak + resident bytes (parameters, Adam state; for DDO also the frozen reference net).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from ddo_patch import memory, upstream
from ddo_patch.losses import DiffusionDDOLoss


def resident_bytes(*objects):
    tensors = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            tensors += list(obj.parameters()) + list(obj.buffers())
        elif isinstance(obj, torch.optim.Optimizer):
            tensors += [v for state in obj.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(step, device):
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def step_peak(step, device):
    if device.type == 'cuda':
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    return memory.step_peak(step)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--channels', type=int, default=192, help='model_channels (EDM2-S: 192)')
    parser.add_argument('--channel-mult', type=lambda s: [int(x) for x in s.split(',')], default=[1, 2, 3, 4], help='per-resolution channel multipliers')
    parser.add_argument('--blocks', type=int, default=3, help='residual blocks per resolution (EDM2: 3)')
    parser.add_argument('--attn', type=lambda s: [int(x) for x in s.split(',') if x], default=[16, 8], help='self-attention resolutions')
    parser.add_argument('--res', type=int, default=64, help='image resolution')
    parser.add_argument('--label-dim', type=int, default=1000, help='number of classes')
    parser.add_argument('--batch', type=int, default=64, help='per-GPU batch of real images (DDO adds as many fakes)')
    parser.add_argument('--repeats', type=int, default=5, help='timed steps of each kind, interleaved')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='cuda or cpu')
    parser.add_argument('--threads', type=int, default=0, help='CPU threads (0 = torch default)')
    parser.add_argument('--edm2-root', default=None, help='NVlabs/edm2 checkout (default: $EDM2_ROOT or the cache)')
    args = parser.parse_args(argv)
    upstream.activate('edm2', args.edm2_root)
    from training.networks_edm2 import Precond
    from training.training_loop import EDM2Loss
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 as upstream's loop sets

    torch.manual_seed(0)
    kwargs = dict(model_channels=args.channels, channel_mult=args.channel_mult, num_blocks=args.blocks, attn_resolutions=args.attn, use_fp16=False)
    nets = {kind: Precond(args.res, 3, args.label_dim, **kwargs).to(device).train().requires_grad_(True) for kind in ('mle', 'ddo')}
    ref = copy.deepcopy(nets['ddo']).eval().requires_grad_(False)
    optimizers = {kind: torch.optim.Adam(net.parameters(), lr=1e-6, betas=(0.9, 0.99)) for kind, net in nets.items()}
    shape = [args.batch, 3, args.res, args.res]
    images, fakes = torch.randn(shape, device=device), torch.randn(shape, device=device)
    labels = torch.eye(args.label_dim, device=device)[torch.randint(args.label_dim, [args.batch], device=device)]
    mle_loss, ddo_loss = EDM2Loss(P_mean=-0.8, P_std=1.6), DiffusionDDOLoss(P_mean=-0.8, P_std=1.6, alpha=4.0, beta=0.05, single_forward=True)

    def mle_step():
        optimizers['mle'].zero_grad(set_to_none=True)
        mle_loss(nets['mle'], images, labels).sum().div(args.batch).backward()
        optimizers['mle'].step()

    def ddo_step():
        optimizers['ddo'].zero_grad(set_to_none=True)
        ddo_loss(nets['ddo'], ref, images, fakes, labels, labels).sum().div(args.batch).backward()
        optimizers['ddo'].step()

    steps = dict(mle=mle_step, ddo=ddo_step)
    for step in steps.values():  # warm-up: allocator, kernels, Adam state
        step()
    times = {kind: [] for kind in steps}
    for _ in range(args.repeats):
        for kind, step in steps.items():
            times[kind].append(timed(step, device))
    peaks = {kind: step_peak(step, device) for kind, step in steps.items()}
    resident = dict(mle=resident_bytes(nets['mle'], optimizers['mle']), ddo=resident_bytes(nets['ddo'], optimizers['ddo'], ref))

    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'EDM2 step cost on {name}: res {args.res}, channels {args.channels}x{args.channel_mult}, blocks {args.blocks}, '
          f'attn {args.attn}, classes {args.label_dim}, batch {args.batch}, fp32, median of {args.repeats}')
    med = {kind: statistics.median(t) for kind, t in times.items()}
    total = {kind: peaks[kind] + resident[kind] for kind in steps}
    for kind in steps:
        print(f'  {kind.upper():3s}  time {med[kind] * 1e3:9.1f} ms   step peak {peaks[kind] / 2**20:9.1f} MiB   '
              f'total peak {total[kind] / 2**20:9.1f} MiB')
    print(f'  ratio DDO/MLE: time {med["ddo"] / med["mle"]:.2f}x (target <= 2.8x), step peak memory '
          f'{peaks["ddo"] / peaks["mle"]:.2f}x, total peak memory {total["ddo"] / total["mle"]:.2f}x (target <= 2.2x)')
