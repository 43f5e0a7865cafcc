"""Expected per-GPU memory of an `edm2_ext.train` step, counted on the meta device (`ddo_patch.memory`).

    python -m edm2_ext.memory --preset ddo-img512-l --batch-gpu 16        # the paper's EDM2-L, in seconds on a CPU

`ddo_step` is one step of upstream's training loop with our loss, on meta copies of the network:
`zero_grad(set_to_none=True)`, `edm2_ext.loss.ddo_loss` on batch_gpu real and as many fake samples (the
trained net in fp32 over cat(real, fake) with backward, the reference over the same batch under
no_grad), `backward`, upstream's in-place `nan_to_num` of the gradients, Adam's update (`foreach=True`,
as torch runs Adam on a GPU: it allocates one temporary the size of the weights) and the EMA's in-place
update. The fixed state adds the power-function EMA's fp32 copy (4P) to the core's. Import after
`ddo_patch.upstream.activate('edm2')`.
"""

from __future__ import annotations

import click
import torch

from ddo_patch import memory, upstream
from ddo_patch.losses import DiffusionDDOLoss
from edm2_ext import presets
from edm2_ext.options import edm2_root as edm2_root_option

# The networks of the presets: upstream train_edm2.py's edm2-img64-s and edm2-img512-l (latents 4 x 64 x 64).
ARCHITECTURES = {
    'ddo-img64-s': {'img_resolution': 64, 'img_channels': 3, 'label_dim': 1000, 'model_channels': 192},
    'ddo-img512-l': {'img_resolution': 64, 'img_channels': 4, 'label_dim': 1000, 'model_channels': 320},
}


def meta_copy(net):
    """A new network of `net`'s class and constructor arguments (upstream's persistence records them), on the meta
    device, fp32 and without dropout as DDO trains it."""
    from edm2_ext.network import fp32_without_dropout
    with torch.device('meta'):
        return fp32_without_dropout(type(net)(*net.init_args, **net.init_kwargs))


def ddo_step(net, ref_net, ema, optimizer, ddo: DiffusionDDOLoss, batch_gpu: int, ema_beta: float = 0.999):
    """One step of upstream's training loop with `edm2_ext.loss.ddo_loss` (one accumulation round, random data);
    without `ref_net`, the matched control's step (`edm2_ext.loss.MLELoss` on the real batch alone)."""
    from edm2_ext.loss import MLELoss, ddo_loss
    device = next(net.parameters()).device
    shape = [batch_gpu, net.img_channels, net.img_resolution, net.img_resolution]
    labels = torch.zeros([batch_gpu, net.label_dim], device=device)
    optimizer.zero_grad(set_to_none=True)
    if ref_net is None:
        loss = MLELoss(P_mean=ddo.P_mean, P_std=ddo.P_std)(net, torch.randn(shape, device=device), labels)
    else:
        loss, _ = ddo_loss(ddo, net, ref_net, torch.randn(shape, device=device), labels, torch.randn(shape, device=device), labels)
    loss.sum().mul(1 / batch_gpu).backward()
    for param in net.parameters():
        if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0, posinf=0, neginf=0, out=param.grad)
    optimizer.step()
    with torch.no_grad():
        for p_net, p_ema in zip(net.parameters(), ema.parameters()):
            p_ema.lerp_(p_net, 1 - ema_beta)


def step_memory(net, batch_gpu: int, ddp: bool = True, P_mean: float = -0.8, P_std: float = 1.6,
                objective: str = 'ddo') -> memory.MemoryEstimate:
    """Expected per-GPU peak of training `net` (any EDM2 Precond, e.g. a snapshot's `ema`) at `batch_gpu`, by DDO
    or by the matched control's MLE loss (objective 'mle': no reference network)."""
    trained = meta_copy(net).train().requires_grad_(True)
    ref = meta_copy(net).eval().requires_grad_(False) if objective == 'ddo' else None
    ema = meta_copy(net).requires_grad_(False)
    optimizer = torch.optim.Adam(trained.parameters(), betas=(0.9, 0.99), foreach=True)
    ddo = DiffusionDDOLoss(P_mean=P_mean, P_std=P_std, single_forward=True)
    memory.create_optimizer_state(optimizer)
    params = memory.parameter_count(trained)
    peak = memory.step_peak(lambda: ddo_step(trained, ref, ema, optimizer, ddo, batch_gpu))
    return memory.MemoryEstimate(batch_gpu, memory.training_state(params, ddp, reference=ref is not None, ema=4 * params), peak)


def preset_network(preset: str):
    """The network of a preset at random weights, on the meta device."""
    from training.networks_edm2 import Precond
    with torch.device('meta'):
        return Precond(**ARCHITECTURES[preset])


@click.command(context_settings={'help_option_names': ['-h', '--help'], 'max_content_width': 110})
@click.option('--preset', type=click.Choice(sorted(ARCHITECTURES)), default='ddo-img64-s', show_default=True, help='Paper preset, for its network.')
@click.option('--batch-gpu', 'batch_gpu', metavar='NIMG', type=click.IntRange(min=1), multiple=True, default=[32], show_default=True, help='Per-GPU batch (repeat for several).')
@click.option('--gpus', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True, help='Processes (more than one: DDP buckets).')
@edm2_root_option
def cmdline(preset, batch_gpu, gpus, edm2_root):
    """Print the expected per-GPU peak memory of edm2_ext.train for a paper preset."""
    upstream.activate('edm2', edm2_root)
    hp = presets.resolve(preset)
    net = preset_network(preset)
    print(f'{preset}: {memory.parameter_count(net) / 1e6:.0f}M parameters, preset batch {hp["batch"]} on {gpus} processes')
    for batch in batch_gpu:
        print(step_memory(net, batch, ddp=gpus > 1, P_mean=hp['P_mean'], P_std=hp['P_std']).describe())


if __name__ == '__main__':
    cmdline()
