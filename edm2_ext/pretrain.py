"""Maximum-likelihood training of an EDM2 Precond with upstream's own training loop, on GPUs or on the CPU.

    python -m edm2_ext.pretrain --data=data.zip --outdir=runs/mle --channels=32 --channel-mult=1,2 \\
        --blocks=2 --duration=4Mi --batch=256 --lr=1e-2 --snapshot=256Ki

Upstream's `train_edm2.py` trains its ImageNet presets on CUDA; this entry builds the same loop
configuration from explicit sizes instead (the small models of experiments and tests, CPU included),
with the adaptations of `edm2_ext.platform`. Upstream's loss (`EDM2Loss`), Adam, learning-rate schedule,
power-function EMA, snapshots and checkpoints run unchanged, so the result is an ordinary EDM2 run:
rerun the command to resume it, or rerun it with a larger --duration to continue training (which is
how a continued-MLE control is made).
"""

from __future__ import annotations

import click

from ddo_patch.distributed import run_entry_point
from ddo_patch.errors import DDOPatchError, exit_on_user_error
from edm2_ext import options
from edm2_ext.train import loader_kwargs, run_training


def setup_pretraining_config(*, data, cond, net, hp, batch_gpu, slice_nimg, seed, workers, device):
    """Upstream `training_loop` keyword arguments for an MLE run of a new Precond (without `device`)."""
    import dnnlib
    from edm2_ext.datasets import ENCODERS, data_interface, open_dataset
    real = open_dataset(data, '--data', use_labels=cond)
    data_interface(real)   # a one-line error for data EDM2 cannot train on
    if cond and not real.has_labels:
        raise DDOPatchError('--cond=True, but --data has no labels (dataset.json); pass --cond=False for an unconditional model')
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=cond)
    c.encoder_kwargs = dnnlib.EasyDict(class_name=ENCODERS[real.num_channels])
    c.data_loader_kwargs = dnnlib.EasyDict(class_name='torch.utils.data.DataLoader', **loader_kwargs(device, workers))
    c.network_kwargs = dnnlib.EasyDict(class_name='training.networks_edm2.Precond', **net)
    c.loss_kwargs = dnnlib.EasyDict(class_name='training.training_loop.EDM2Loss', P_mean=hp['P_mean'], P_std=hp['P_std'])
    c.lr_kwargs = dnnlib.EasyDict(func_name='training.training_loop.learning_rate_schedule', ref_lr=hp['lr'],
                                  ref_batches=hp['decay'], rampup_Mimg=hp['rampup'])
    c.ema_kwargs = dnnlib.EasyDict(class_name='training.phema.PowerFunctionEMA', stds=list(hp['ema_std']))
    c.update(total_nimg=hp['duration'], batch_size=hp['batch'], batch_gpu=batch_gpu or None, slice_nimg=slice_nimg or None,
             status_nimg=hp['status'] or None, snapshot_nimg=hp['snapshot'] or None,
             checkpoint_nimg=hp['checkpoint'] or None, seed=seed)
    return c


@click.command(context_settings=dict(help_option_names=['-h', '--help'], max_content_width=110, show_default=True))
@click.option('--outdir', metavar='DIR', required=True, help='Run directory; rerun the same command to resume it.')
@click.option('--data', metavar='ZIP|DIR', required=True, help='Training data in EDM2 format.')
@click.option('--cond', metavar='BOOL', type=bool, default=True, help='Class-conditional (labels from dataset.json).')
@click.option('--channels', 'model_channels', metavar='INT', type=click.IntRange(min=1), default=64, help='UNet base channels.')
@click.option('--channel-mult', metavar='LIST', type=options.INT_LIST, default='1,2,3,4', help='Channel multiplier per resolution.')
@click.option('--blocks', 'num_blocks', metavar='INT', type=click.IntRange(min=1), default=3, help='Residual blocks per resolution.')
@click.option('--attn', 'attn_resolutions', metavar='LIST', type=options.INT_LIST, default='', help='Resolutions with self-attention (empty: none).')
@click.option('--dropout', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0.0, help='Dropout probability.')
@click.option('--duration', metavar='NIMG', type=options.NIMG, required=True, help='Train for this many images in all.')
@click.option('--batch', metavar='NIMG', type=options.NIMG, default=256, help='Total batch size.')
@click.option('--batch-gpu', metavar='NIMG', type=options.NIMG, default=0, help='Limit batch per process (gradient accumulation); 0 = no limit.')
@click.option('--lr', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-2, help='Peak learning rate (upstream ref_lr).')
@click.option('--decay', metavar='BATCHES', type=click.FloatRange(min=0), default=0, help='Learning-rate decay reference t_ref; 0 = no decay.')
@click.option('--rampup', metavar='MIMG', type=click.FloatRange(min=0), default=0, help='Learning-rate ramp-up in millions of images.')
@click.option('--P_mean', 'P_mean', metavar='FLOAT', type=float, default=-0.4, help='Mean of log sigma.')
@click.option('--P_std', 'P_std', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1.0, help='Std of log sigma.')
@click.option('--ema-std', 'ema_std', metavar='LIST', type=options.FLOAT_LIST, default='0.1', help='Power-function EMA lengths (one snapshot each).')
@click.option('--status', metavar='NIMG', type=options.NIMG, default=0, help='Interval of status lines and stats.jsonl rows; 0 = none.')
@click.option('--snapshot', metavar='NIMG', type=options.NIMG, required=True, help='Interval of network snapshots.')
@click.option('--checkpoint', metavar='NIMG', type=options.NIMG, default=0, help='Interval of training-state checkpoints; 0 = none.')
@click.option('--slice', 'slice_nimg', metavar='NIMG', type=options.NIMG, default=0, help='Stop after this many images (rounded to checkpoints); 0 = run to the end.')
@click.option('--seed', metavar='INT', type=int, default=0, help='Random seed.')
@click.option('--workers', metavar='INT', type=click.IntRange(min=0), default=2, help='Data-loading processes per rank.')
@click.option('-n', '--dry-run', is_flag=True, help='Check the inputs, print the training options and exit.')
@options.edm2_root
def cmdline(outdir, data, cond, batch_gpu, slice_nimg, seed, workers, dry_run, edm2_root, model_channels, channel_mult,
            num_blocks, attn_resolutions, dropout, **hp):
    """Train a new EDM2 Precond by maximum likelihood with the official EDM2 training loop."""
    net = dict(model_channels=model_channels, channel_mult=list(channel_mult), num_blocks=num_blocks,
               attn_resolutions=list(attn_resolutions), dropout=dropout)
    run_training(outdir, lambda device: setup_pretraining_config(
        data=data, cond=cond, net=net, hp=hp, batch_gpu=batch_gpu, slice_nimg=slice_nimg, seed=seed, workers=workers,
        device=device), dry_run=dry_run, edm2_root=edm2_root)


if __name__ == '__main__':
    import torch.multiprocessing
    torch.multiprocessing.set_start_method('spawn')  # as upstream: data-loader workers must not fork CUDA state
    run_entry_point(exit_on_user_error(cmdline))
