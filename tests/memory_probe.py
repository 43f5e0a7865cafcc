"""Peak RSS of real CPU DDO steps next to `ddo_patch.memory`'s count of the same steps on the meta device.

    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 python tests/memory_probe.py 8 16

Run by tests/test_memory.py in a fresh process: with glibc's mmap threshold fixed, large blocks are
mapped and unmapped, so freed tensors leave the RSS and the step's peak RSS above the RSS before it
(Linux's VmHWM, reset through /proc/self/clear_refs) is the bytes the step held at once. Prints one
JSON row per backend and batch: backend, batch, measured bytes, counted bytes. Small models, one thread; the counted step is
the one `edm2_ext.memory` / `var_ext.memory` count for a GPU (Adam with foreach, attention without an
L x L matrix), run here on real CPU tensors.
"""

import copy
import gc
import json
import sys

import torch

from ddo_patch import upstream


def _status_kib(field):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ':'))


def measured_peak(step) -> int:
    """Bytes of the RSS's high-water mark during `step()` above the RSS before it."""
    gc.collect()
    before = _status_kib('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')   # reset VmHWM to the current RSS
    step()
    return (_status_kib('VmHWM') - before) * 1024


def edm2(batches):
    upstream.activate('edm2')
    from training.networks_edm2 import Precond

    from ddo_patch.losses import DiffusionDDOLoss
    from edm2_ext import memory
    from edm2_ext.network import fp32_without_dropout
    torch.manual_seed(0)
    net = Precond(16, 3, 10, model_channels=32, channel_mult=[1], num_blocks=1, attn_resolutions=[16])
    counted = [memory.step_memory(net, batch, ddp=False).step for batch in batches]
    trained = fp32_without_dropout(net).train().requires_grad_(True)
    ref, ema = copy.deepcopy(trained).eval().requires_grad_(False), copy.deepcopy(trained).requires_grad_(False)
    optimizer = torch.optim.Adam(trained.parameters(), betas=(0.9, 0.99), foreach=True)
    ddo = DiffusionDDOLoss(single_forward=True)
    memory.ddo_step(trained, ref, ema, optimizer, ddo, batches[0])   # Adam's state, as after the first step
    rows = []
    for batch, count in zip(batches, counted):
        optimizer.zero_grad(set_to_none=True)
        rows.append((batch, measured_peak(lambda b=batch: memory.ddo_step(trained, ref, ema, optimizer, ddo, b)), count))
    return rows


def var(batches):
    from var_ext import memory, models
    from var_ext.trainer import build_optimizer
    models.activate_upstream()
    cfg = models.VARConfig(depth=2, patch_nums=(1, 2, 3, 4, 6, 8), num_classes=10, vae_vocab=1024, vae_ch=32)
    counted = [memory.step_memory(cfg, batch, ddp=False).step for batch in batches]
    torch.manual_seed(0)
    vae, model = models.build(cfg, 'cpu')
    ref = models.frozen_copy(model)
    model.train()
    opt = build_optimizer(model, lr=4e-6, weight_decay=0.05, grad_clip=2.0, mixed_precision=0)
    cpu = torch.device('cpu')
    memory.ddo_step(model, ref, vae.quantize, opt, *memory.random_batch(cfg, batches[0], cpu))   # AdamW's state
    rows = []
    for batch, count in zip(batches, counted):
        inputs = memory.random_batch(cfg, batch, cpu)
        rows.append((batch, measured_peak(lambda x=inputs: memory.ddo_step(model, ref, vae.quantize, opt, *x)), count))
    return rows


if __name__ == '__main__':
    torch.set_num_threads(1)
    for name, probe in (('edm2', edm2), ('var', var)):
        for batch, rss, count in probe([int(b) for b in sys.argv[1:]]):
            print(json.dumps({'backend': name, 'batch': batch, 'measured': rss, 'counted': count}), flush=True)
