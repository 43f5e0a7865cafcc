"""Everything a GPU can show, in one command: step cost per precision mode, peak memory against the plan, and
VAR's guidance-free sampler against upstream's.

    python benchmarks/gpu_check.py --out runs/gpu_check              # on one GPU: paper sizes, under 8 minutes
    python benchmarks/gpu_check.py --out runs/gpu_check --size cpu   # the same, reduced, on a CPU (a dry run of it)

1. EDM2-S at ImageNet-64 (random weights, upstream's initialisation) at the paper config's per-GPU batch
   (configs/edm2-img64-s.toml: batch_gpu 32): upstream's MLE step as upstream trains (fp16 activations,
   `use_fp16=True`, EDM2Loss, Adam) against the DDO step (`DiffusionDDOLoss`, single forward over cat(real, fake),
   no-grad reference forward) in each `ddo_patch.precision` mode, interleaved; the ratio to upstream's step
   (target: <= 4x in the mode that keeps DDO's gain). Peak memory of each step (torch.cuda.max_memory_allocated
   above what was resident, plus the resident parameters, Adam state and reference net) against
   `edm2_ext.memory.step_memory`'s plan, which counts the fp32 step (EMA and DDP buckets excluded here).
2. VAR-d16 at 256px (random weights) at configs/var-d16.toml's batch_gpu 16: `benchmarks/step_cost_var.py`'s DDO
   step (online reference sampling included) against upstream's `VARTrainer.train_step`, and
   `benchmarks/sampler_speed.py`'s sampler against upstream's `autoregressive_infer_cfg(cfg=0)`, both in bf16 AMP.
On a CPU upstream's fp16 flag does nothing (EDM2 runs fp16 only on CUDA) and TF32 is emulated, so the CPU
numbers check that the script runs, not what a GPU costs. Writes OUT/gpu_check.json and OUT/gpu_check.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sampler_speed  # noqa: E402
import step_cost_var  # noqa: E402
from step_cost_edm2 import resident_bytes, step_peak, timed  # noqa: E402

from ddo_patch import upstream  # noqa: E402
from ddo_patch.files import write_atomic  # noqa: E402
from ddo_patch.losses import DiffusionDDOLoss  # noqa: E402
from ddo_patch.precision import MODES, Precision  # noqa: E402

SIZES = {
    'gpu': dict(edm2=dict(model_channels=192, img_resolution=64, label_dim=1000, batch=32, repeats=5),
                var=['--depth', '16', '--batch', '16', '--repeats', '3', '--amp', 'bf16']),
    'cpu': dict(edm2=dict(model_channels=32, img_resolution=16, label_dim=10, batch=4, repeats=2, channel_mult=[1, 2], num_blocks=1,
                          attn_resolutions=[8]),
                var=['--depth', '2', '--batch', '2', '--repeats', '1', '--patch-nums', '1_2_3_4', '--vae-ch', '32', '--amp', 'bf16']),
}


def edm2_steps(size: dict, device) -> dict:
    """Seconds per step (medians, interleaved), step peak and total peak bytes of upstream's MLE step and of the
    DDO step per precision mode, and the memory plan."""
    from training.networks_edm2 import Precond
    from training.training_loop import EDM2Loss

    from edm2_ext.memory import step_memory
    size = dict(size)
    batch, repeats = size.pop('batch'), size.pop('repeats')
    torch.manual_seed(0)
    base = Precond(img_channels=3, use_fp16=False, **size)
    for name, param in base.named_parameters():
        if name.endswith('_gain'):   # upstream initialises these to 0 (D(x) = c_skip x): give the step real work
            param.data.fill_(1.0)
    mle_net = copy.deepcopy(base).to(device).train().requires_grad_(True)
    mle_net.use_fp16 = True                          # upstream's training: fp16 activations on CUDA
    ddo_net = copy.deepcopy(base).to(device).train().requires_grad_(True)
    ref = copy.deepcopy(base).to(device).eval().requires_grad_(False)
    optimizers = {'mle': torch.optim.Adam(mle_net.parameters(), lr=1e-6, betas=(0.9, 0.99)),
                  'ddo': torch.optim.Adam(ddo_net.parameters(), lr=1e-6, betas=(0.9, 0.99))}
    shape = [batch, 3, size['img_resolution'], size['img_resolution']]
    images, fakes = torch.randn(shape, device=device), torch.randn(shape, device=device)
    labels = torch.eye(size['label_dim'], device=device)[torch.randint(size['label_dim'], [batch], device=device)]
    mle_loss = EDM2Loss(P_mean=-0.8, P_std=1.6)
    ddo_loss = DiffusionDDOLoss(P_mean=-0.8, P_std=1.6, alpha=4.0, beta=0.05, single_forward=True)

    def fp32_default():   # upstream's loop turns TF32 off; only the tf32 mode turns it on again
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def mle_step():
        fp32_default()
        optimizers['mle'].zero_grad(set_to_none=True)
        mle_loss(mle_net, images, labels).sum().div(batch).backward()
        optimizers['mle'].step()

    def ddo_step(mode):
        fp32_default()
        precision = Precision(mode, device.type)
        with precision.loop():
            optimizers['ddo'].zero_grad(set_to_none=True)
            with precision.forward():
                loss = ddo_loss(lambda x, s, c: ddo_net(x, s, c, force_fp32=True), lambda x, s, c: ref(x, s, c, force_fp32=True),
                                images, fakes, labels, labels)
            loss.sum().div(batch).backward()
            optimizers['ddo'].step()

    steps = {'mle fp16 (upstream)': mle_step, **{f'ddo {mode}': (lambda m=mode: ddo_step(m)) for mode in MODES}}
    for step in steps.values():
        step()                                       # warm-up: kernels, allocator, Adam state
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step, device))
    peaks = {name: step_peak(step, device) for name, step in steps.items()}
    resident = {name: resident_bytes(mle_net, optimizers['mle']) if name.startswith('mle') else
                resident_bytes(ddo_net, optimizers['ddo'], ref) for name in steps}
    with torch.device('meta'):
        plan = step_memory(Precond(img_channels=3, use_fp16=False, **size), batch, ddp=False)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return dict(batch=batch, repeats=repeats, network=size, seconds=seconds,
                ratio_to_upstream={name: s / seconds['mle fp16 (upstream)'] for name, s in seconds.items()},
                step_peak_bytes=peaks, total_peak_bytes={name: peaks[name] + resident[name] for name in steps},
                plan_step_peak_bytes=plan.step, plan_total_bytes=plan.total)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='Directory for gpu_check.json and gpu_check.md.')
    parser.add_argument('--size', choices=sorted(SIZES), default='gpu' if torch.cuda.is_available() else 'cpu',
                        help='gpu: EDM2-S and VAR-d16 at the paper configs\' per-GPU batch; cpu: reduced (default: by device).')
    parser.add_argument('--edm2-root', default=None, help='NVlabs/edm2 checkout (default: $EDM2_ROOT or the cache)')
    parser.add_argument('--var-root', default=None, help='FoundationVision/VAR checkout (default: $VAR_ROOT or the cache)')
    args = parser.parse_args(argv)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    start = time.time()
    upstream.activate('edm2', args.edm2_root)
    edm2 = edm2_steps(SIZES[args.size]['edm2'], device)
    print(f'EDM2 ({name}): ' + ', '.join(f'{k} {v * 1e3:.1f} ms ({edm2["ratio_to_upstream"][k]:.2f}x)' for k, v in edm2['seconds'].items()),
          flush=True)
    var_args = SIZES[args.size]['var'] + (['--var-root', args.var_root] if args.var_root else [])
    var_step = step_cost_var.measure(step_cost_var.parser().parse_args(var_args))
    var_sampler = sampler_speed.measure(sampler_speed.parser().parse_args(var_args))
    result = dict(device=name, size=args.size, torch=torch.__version__, edm2=edm2, var_step=var_step, var_sampler=var_sampler,
                  seconds=time.time() - start)
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, 'gpu_check.json'), lambda f: f.write(json.dumps(result, indent=2).encode()))
    mib = 2 ** 20
    lines = [f'Device: {name} ({args.size} size, torch {torch.__version__}); {result["seconds"]:.0f} s in all.', '',
             f'EDM2 (channels {edm2["network"]["model_channels"]}, {edm2["network"]["img_resolution"]}px, per-GPU batch '
             f'{edm2["batch"]} real images; DDO adds as many reference samples; median of {edm2["repeats"]}):', '',
             '| step | ms | vs upstream MLE (fp16) | step peak MiB | total peak MiB |', '|---|---|---|---|---|']
    for step, seconds in edm2['seconds'].items():
        lines.append(f'| {step} | {seconds * 1e3:.1f} | {edm2["ratio_to_upstream"][step]:.2f}x | {edm2["step_peak_bytes"][step] / mib:.0f} | '
                     f'{edm2["total_peak_bytes"][step] / mib:.0f} |')
    lines += ['', f'Plan (`edm2_ext.memory`, fp32 DDO step, no DDP): step peak {edm2["plan_step_peak_bytes"] / mib:.0f} MiB, '
                  f'total {edm2["plan_total_bytes"] / mib:.0f} MiB (includes the EMA); measured fp32 DDO: '
                  f'{edm2["step_peak_bytes"]["ddo fp32"] / mib:.0f} / {edm2["total_peak_bytes"]["ddo fp32"] / mib:.0f} MiB.', '',
              f'VAR depth {var_step["depth"]} ({var_step["params_m"]:.0f}M), batch {var_step["batch"]}, AMP {var_step["amp"]}: '
              f'DDO step {var_step["ddo_seconds"]:.3f} s, upstream train_step {var_step["mle_seconds"]:.3f} s, '
              f'{var_step["ddo_seconds"] / var_step["mle_seconds"]:.2f}x; peak GiB {var_step["peak_gib"] or "-"}.',
              f'VAR sampler (cfg 0, batch {var_sampler["batch"]}): tokens ours {var_sampler["seconds"]["tokens ours"]:.3f} s, upstream '
              f'{var_sampler["seconds"]["tokens upstream"]:.3f} s ({var_sampler["seconds"]["tokens upstream"] / var_sampler["seconds"]["tokens ours"]:.2f}x); '
              f'with the decode ours {var_sampler["seconds"]["images ours"]:.3f} s, upstream {var_sampler["seconds"]["images upstream"]:.3f} s.']
    with open(os.path.join(args.out, 'gpu_check.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
