"""DDO finetuning of an EDM2 snapshot inside the official EDM2 training loop.

    torchrun --standalone --nproc_per_node=8 -m edm2_ext.train --preset=ddo-img64-s \\
        --ref=edm2-img64-s-1073741-0.075.pkl --fake=refs/img64-s.zip --data=datasets/img64.zip \\
        --ddo-alpha=4 --ddo-beta=0.05 --outdir=runs/round01

Upstream `training.training_loop.training_loop` runs unchanged; DDO is swapped in by class name, the way
EDM2 is configured: `network_kwargs` names `edm2_ext.network.ddo_network` (the `--ref` EMA net, fp32,
dropout off) and `loss_kwargs` names `edm2_ext.loss.DDOLoss` (reference net, fake stream, DDO loss).
Upstream's Adam, learning-rate schedule, power-function EMA, snapshots, and checkpoint/resume are kept:
rerun the same command to resume from the latest training-state-*.pt. Every input is checked before
anything is written to --outdir.

`--objective mle` is the matched control: the same run (init from --ref, Adam, schedule, EMA, data order,
snapshots, checkpoints) with upstream's own `EDM2Loss` at the same P_mean/P_std, in fp32 as DDO trains, and no
reference network or samples (--fake is not needed). A low learning rate and best-of-N selection improve a
model by themselves; what DDO gains beyond this control is the objective's.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import click

from ddo_patch import upstream
from ddo_patch.distributed import barrier, device_for_this_rank, run_entry_point
from ddo_patch.errors import DDOPatchError, exit_on_user_error
from ddo_patch.losses import OBJECTIVES, check_hyperparameters
from ddo_patch.precision import Precision
from ddo_patch.preemption import EXIT_INTERRUPTED, Interrupted, StopRequest
from edm2_ext import options, presets, run_files


def check_intervals(c, world_size):
    """Upstream asserts these; we say what to change instead."""
    if c.batch_size % world_size:
        raise DDOPatchError(f'--batch {c.batch_size} is not divisible by the {world_size} processes')
    per_gpu = c.batch_size // world_size
    if c.batch_gpu is not None and c.batch_gpu < per_gpu and per_gpu % c.batch_gpu:
        raise DDOPatchError(f'--batch-gpu {c.batch_gpu} must divide the per-process batch {per_gpu}')
    for option, nimg, also_1024 in (('--duration', c.total_nimg, False), ('--slice', c.slice_nimg, False),
                                    ('--status', c.status_nimg, False), ('--snapshot', c.snapshot_nimg, True),
                                    ('--checkpoint', c.checkpoint_nimg, True)):
        if nimg is not None and (nimg % c.batch_size or (also_1024 and nimg % 1024)):
            raise DDOPatchError(f'{option} {nimg} must be a multiple of --batch {c.batch_size}' + (' and of 1024' if also_1024 else ''))


def loader_kwargs(device, workers) -> dict:
    return dict(pin_memory=device.type == 'cuda', num_workers=workers, prefetch_factor=2 if workers > 0 else None)


def setup_training_config(*, data, ref, fake, cond, hp, alpha, beta, batch_gpu, slice_nimg, seed, workers, device,
                          objective='ddo', precision='fp32'):
    """Check every input and return upstream `training_loop` keyword arguments (without `device`). With objective
    'mle' (the matched control) the loss is upstream's `EDM2Loss` and `fake` is neither needed nor read."""
    import dnnlib
    from edm2_ext.datasets import ENCODERS, check_fake_set, data_interface, open_dataset
    from edm2_ext.network import interface, load_snapshot

    if objective == 'ddo' and not fake:
        raise DDOPatchError('--fake is required for --objective ddo: the reference samples of --ref (python -m edm2_ext.generate)')
    net_interface = interface(load_snapshot(ref)['ema'])
    real = open_dataset(data, '--data', use_labels=cond)
    if cond and net_interface[2] > 0 and not real.has_labels:
        raise DDOPatchError('--cond=True, but --data has no labels (dataset.json)')
    if data_interface(real) != net_interface:
        raise DDOPatchError(f'--data gives (resolution, channels, label_dim) = {data_interface(real)} but the --ref network '
                            f'expects {net_interface}; use the data the network was trained on (or --cond=False for an unconditional net)')
    if objective == 'ddo':
        fake_set = open_dataset(fake, '--fake', use_labels=net_interface[2] > 0)
        check_fake_set(fake_set, net_interface, latent=real.num_channels == 8)

    loader = loader_kwargs(device, workers)
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=cond)
    c.encoder_kwargs = dnnlib.EasyDict(class_name=ENCODERS[real.num_channels])
    c.data_loader_kwargs = dnnlib.EasyDict(class_name='torch.utils.data.DataLoader', **loader)
    c.network_kwargs = dnnlib.EasyDict(class_name='edm2_ext.network.ddo_network', ref=ref)
    if objective == 'ddo':
        c.loss_kwargs = dnnlib.EasyDict(class_name='edm2_ext.loss.DDOLoss', ref=ref, fake=fake, P_mean=hp['P_mean'],
                                        P_std=hp['P_std'], alpha=alpha, beta=beta, use_labels=net_interface[2] > 0,
                                        seed=seed, loader_kwargs=loader, precision=precision)
    else:
        c.loss_kwargs = dnnlib.EasyDict(class_name='edm2_ext.loss.MLELoss', P_mean=hp['P_mean'], P_std=hp['P_std'],
                                        precision=precision)
    c.lr_kwargs = dnnlib.EasyDict(func_name='training.training_loop.learning_rate_schedule', ref_lr=hp['lr'],
                                  ref_batches=hp['decay'], rampup_Mimg=hp['rampup'])
    c.ema_kwargs = dnnlib.EasyDict(class_name='training.phema.PowerFunctionEMA', stds=[hp['ema_std']])
    c.update(total_nimg=hp['duration'], batch_size=hp['batch'], batch_gpu=batch_gpu or None, slice_nimg=slice_nimg or None,
             status_nimg=hp['status'] or None, snapshot_nimg=hp['snapshot'] or None,
             checkpoint_nimg=hp['checkpoint'] or None, seed=seed)
    return c


def launch_training(run_dir, c, device, max_nonfinite=20):
    """Upstream's loop on the options `c`, with edm2_ext's step-boundary hooks (`edm2_ext.loop_hooks`): SIGUSR1 or
    SIGTERM ends it after the step in progress with the training state written and exit status 75 (rerun to
    resume); non-finite steps are counted in stats.jsonl and more than `max_nonfinite` in a row stop it."""
    import dnnlib
    import training.training_loop
    from torch_utils import distributed as dist
    from edm2_ext.loop_hooks import StepHooks
    from edm2_ext.platform import upstream_compatible
    if dist.get_rank() == 0 and not os.path.isdir(run_dir):
        os.makedirs(run_dir)
        with open(os.path.join(run_dir, run_files.OPTIONS), 'wt') as f:
            json.dump(c, f, indent=2)
    barrier()
    dnnlib.util.Logger(file_name=os.path.join(run_dir, 'log.txt'), file_mode='a', should_flush=True)
    steps_per_status = (c.status_nimg or c.batch_size) // c.batch_size
    precision = Precision(c.loss_kwargs.get('precision', 'fp32'), device.type)   # pretraining's EDM2Loss has none
    with upstream_compatible(device), StopRequest(device) as stop, precision.loop(), \
            StepHooks(run_dir, stop, c.total_nimg, steps_per_status, max_nonfinite, device).installed():
        try:
            training.training_loop.training_loop(run_dir=run_dir, device=device, **c)
        except Interrupted:
            sys.exit(EXIT_INTERRUPTED)


@click.command(context_settings=dict(help_option_names=['-h', '--help'], max_content_width=110))
@click.option('--outdir', metavar='DIR', required=True, help='Run directory; rerun the same command to resume it.')
@click.option('--data', metavar='ZIP|DIR', required=True, help='Real training data in EDM2 format.')
@click.option('--ref', metavar='PKL|URL', required=True, help='Pretrained EDM2 snapshot: initialises the trained and the frozen reference net.')
@click.option('--fake', metavar='ZIP|DIR', default=None,
              help='Reference samples of --ref (python -m edm2_ext.generate); not read by --objective mle.')
@click.option('--objective', type=click.Choice(OBJECTIVES), default='ddo', show_default=True,
              help='ddo, or mle: the matched control, this run with upstream\'s EDM2Loss instead of DDO\'s.')
@click.option('--cond', metavar='BOOL', type=bool, default=True, show_default=True, help='Use the class labels of --data.')
@click.option('--preset', type=click.Choice(sorted(presets.PRESETS)), default='ddo-img64-s', show_default=True, help='Appendix C hyperparameters.')
@click.option('--round', 'round_idx', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True, help='DDO round (1-based): picks the preset\'s P_std and lr for it.')
@click.option('--ddo-alpha', 'alpha', metavar='FLOAT', type=float, default=1.0, show_default=True, help='Weight of the fake term, >= 0 (paper sweeps 0.5-6).')
@click.option('--ddo-beta', 'beta', metavar='FLOAT', type=float, default=0.02, show_default=True, help='Discriminator temperature, > 0 (paper sweeps 0.01-0.1).')
@click.option('--duration', metavar='NIMG', type=options.NIMG, default=None, help='Images to train on in this round.  [default: preset]')
@click.option('--batch', metavar='NIMG', type=options.NIMG, default=None, help='Total batch size (real images per step).  [default: preset]')
@click.option('--lr', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None, help='Peak learning rate.  [default: preset, by round]')
@click.option('--decay', metavar='BATCHES', type=click.FloatRange(min=0), default=None, help='Learning-rate decay reference (t_ref).  [default: preset]')
@click.option('--rampup', metavar='MIMG', type=click.FloatRange(min=0), default=None, help='Learning-rate ramp-up in millions of images.  [default: preset]')
@click.option('--P_mean', 'P_mean', metavar='FLOAT', type=float, default=None, help='Mean of log sigma.  [default: preset]')
@click.option('--P_std', 'P_std', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None, help='Std of log sigma.  [default: preset, by round]')
@click.option('--ema-std', 'ema_std', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None, help='Power-function EMA length (relative std).  [default: preset]')
@click.option('--batch-gpu', metavar='NIMG', type=options.NIMG, default=0, show_default=True, help='Limit batch per process (gradient accumulation); 0 = no limit.')
@click.option('--workers', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True, help='Data-loading processes per rank (each for real and fake data).')
@click.option('--status', metavar='NIMG', type=options.NIMG, default=None, help='Interval of status lines and stats.jsonl rows.  [default: preset]')
@click.option('--snapshot', metavar='NIMG', type=options.NIMG, default=None, help='Interval of network snapshots (evaluation points).  [default: preset]')
@click.option('--checkpoint', metavar='NIMG', type=options.NIMG, default=None, help='Interval of training-state checkpoints.  [default: preset]')
@click.option('--slice', 'slice_nimg', metavar='NIMG', type=options.NIMG, default=0, show_default=True, help='Stop after this many images (rounded to checkpoints); 0 = run to the end.')
@click.option('--seed', metavar='INT', type=int, default=0, show_default=True, help='Random seed.')
@click.option('--precision', type=click.Choice(options.offered_precisions()), default='fp32', show_default=True,
              help='Numerical precision of the step (ddo_patch.precision): fp32 as the paper; the others offered kept >= 90% of '
                   'its gain on the digits benchmark (docs/edm2.md).')
@click.option('--max-nonfinite', metavar='INT', type=click.IntRange(min=0), default=20, show_default=True,
              help='Stop after more than INT consecutive steps with non-finite gradients (which upstream zeroes).')
@click.option('-n', '--dry-run', is_flag=True, help='Check the inputs, print the training options and the expected per-GPU peak memory, and exit.')
@options.edm2_root
def cmdline(outdir, data, ref, fake, objective, cond, preset, round_idx, alpha, beta, batch_gpu, workers, slice_nimg, seed,
            precision, max_nonfinite, dry_run, edm2_root, **hyperparameters):
    """DDO-finetune an EDM2 snapshot with the official EDM2 training loop (on GPUs, or on the CPU).

    \b
    Round r of the paper's ImageNet-64 recipe on 8 GPUs:
      torchrun --standalone --nproc_per_node=8 -m edm2_ext.train --preset=ddo-img64-s --round=r \\
          --ref=ref.pkl --fake=fake.zip --data=img64.zip --ddo-alpha=4 --ddo-beta=0.05 --outdir=runs/r

    \b
    Its matched control, the same run with upstream's EDM2Loss (no reference samples):
      torchrun --standalone --nproc_per_node=8 -m edm2_ext.train --preset=ddo-img64-s --round=r \\
          --ref=ref.pkl --objective=mle --data=img64.zip --outdir=runs/r-control
    """
    hp = presets.resolve(preset, round_idx, **hyperparameters)
    train(outdir, data, ref, fake, cond, hp, alpha, beta, batch_gpu=batch_gpu, workers=workers, slice_nimg=slice_nimg,
          seed=seed, dry_run=dry_run, edm2_root=edm2_root, objective=objective, max_nonfinite=max_nonfinite, precision=precision)


def train(outdir, data, ref, fake, cond, hp, alpha, beta, batch_gpu=0, workers=2, slice_nimg=0, seed=0, dry_run=False,
          edm2_root=None, objective='ddo', max_nonfinite=20, precision='fp32'):
    """Check every input, then run one DDO run, or its matched MLE control (the body of this entry and of the
    patched train_edm2.py)."""
    if objective == 'ddo':
        check_hyperparameters(alpha, beta)
    run_training(outdir, lambda device: setup_training_config(
        data=data, ref=ref, fake=fake, cond=cond, hp=hp, alpha=alpha, beta=beta, batch_gpu=batch_gpu,
        slice_nimg=slice_nimg, seed=seed, workers=workers, device=device, objective=objective, precision=precision), dry_run=dry_run,
        edm2_root=edm2_root, estimate=lambda c, world_size: expected_memory(c, world_size, objective), max_nonfinite=max_nonfinite)


def expected_memory(c, world_size, objective='ddo'):
    """`edm2_ext.memory`'s expected per-GPU peak for the options `c` and the objective, at upstream's per-GPU batch
    (--batch-gpu, at most --batch / world size)."""
    from edm2_ext.memory import step_memory
    from edm2_ext.network import load_snapshot
    per_gpu = c.batch_size // world_size
    return step_memory(load_snapshot(c.network_kwargs.ref)['ema'], min(c.batch_gpu or per_gpu, per_gpu), ddp=world_size > 1,
                       P_mean=c.loss_kwargs.P_mean, P_std=c.loss_kwargs.P_std, objective=objective)


def run_training(outdir, configure, dry_run=False, edm2_root=None, estimate=None, max_nonfinite=20):
    """Join the process group, build upstream `training_loop` arguments with `configure(device)` (which checks the
    inputs), print them, and run the loop (or stop there for a dry run, after printing `estimate(c, world_size)`,
    the expected memory, if given). Shared by edm2_ext.train and .pretrain."""
    upstream.activate('edm2', edm2_root)
    warnings.filterwarnings('ignore', 'You are using `torch.load` with `weights_only=False`')
    from torch_utils import distributed as dist
    from edm2_ext.platform import init_distributed

    device = device_for_this_rank()
    init_distributed(device)
    c = configure(device)
    check_intervals(c, dist.get_world_size())
    dist.print0(json.dumps(dict(c, device=str(device), world_size=dist.get_world_size()), indent=2))
    if dry_run:
        if estimate is not None and dist.get_rank() == 0:
            print(estimate(c, dist.get_world_size()).describe(), flush=True)
        dist.print0('Dry run; exiting.')
        return
    launch_training(outdir, c, device, max_nonfinite)


if __name__ == '__main__':
    import torch.multiprocessing
    torch.multiprocessing.set_start_method('spawn')  # as upstream: data-loader workers must not fork CUDA state
    run_entry_point(exit_on_user_error(cmdline))
