"""What upstream's scripts call once `ddo-patch apply` has patched them (patches/edm2).

`torchrun train_edm2.py --preset=ddo-img64-s --ddo-ref=ref.pkl --ddo-fake=fake.zip --data=... --outdir=...`
runs the same DDO run as `python -m edm2_ext.train`, with upstream's option names (`--ddo-round` is
edm2_ext.train's `--round`: the preset's P_std and lr of that round): `--duration`, `--batch`,
`--lr`, `--decay`, `--P_mean`, `--P_std`, `--status`, `--snapshot` and `--checkpoint` override the DDO
preset only when given on the command line (upstream's defaults are pretraining values: 8Mi snapshots,
lr 0.01), and the options that describe a network to build (`--channels`, `--dropout`, `--fp16`, `--ls`,
`--bench`) are refused, because DDO trains the `--ddo-ref` network in fp32 without dropout.
"""

from __future__ import annotations

import click

from ddo_patch.distributed import end_process
from ddo_patch.errors import DDOPatchError
from edm2_ext import presets, train

HYPERPARAMETERS = ('duration', 'batch', 'lr', 'decay', 'P_mean', 'P_std', 'status', 'snapshot', 'checkpoint')
NETWORK_OPTIONS = ('channels', 'dropout', 'fp16', 'ls', 'bench')


def _given_on_command_line(names) -> set:
    ctx = click.get_current_context()
    return {name for name in names if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}


def train_edm2_ddo(outdir, dry_run, edm2_root, ddo_ref, ddo_fake, ddo_alpha, ddo_beta, preset, data, cond, batch_gpu,
                   seed, ddo_round=1, **opts):
    """Body of the patched `train_edm2.py` when `--ddo-ref` or `--ddo-fake` is given (called inside its click command);
    ends the process when the run is done."""
    try:
        _train(outdir, dry_run, edm2_root, ddo_ref, ddo_fake, ddo_alpha, ddo_beta, ddo_round, preset, data, cond, batch_gpu,
               seed, opts)
    except DDOPatchError as err:  # upstream's command reports its own input errors as ClickExceptions, one line each
        raise click.ClickException(str(err)) from None
    end_process()  # the script has nothing left to do; leave the process group as edm2_ext.train does


def _train(outdir, dry_run, edm2_root, ddo_ref, ddo_fake, ddo_alpha, ddo_beta, ddo_round, preset, data, cond, batch_gpu,
           seed, opts):
    if ddo_ref is None or ddo_fake is None:
        raise DDOPatchError('DDO needs both --ddo-ref (the pretrained snapshot) and --ddo-fake (its class-balanced samples)')
    if preset not in presets.PRESETS:
        raise DDOPatchError(f'--preset={preset} is a pretraining preset; DDO needs one of {", ".join(presets.PRESETS)} '
                            f'(the paper\'s finetuning hyperparameters)')
    refused = sorted(_given_on_command_line(NETWORK_OPTIONS))
    if refused:
        raise DDOPatchError(f'{", ".join("--" + name for name in refused)} does not apply to DDO: it trains the --ddo-ref '
                            f'network as it is, in fp32 without dropout; remove it')
    given = _given_on_command_line(HYPERPARAMETERS)
    hp = presets.resolve(preset, ddo_round, **{name: opts[name] for name in given})
    train.train(outdir, data, ddo_ref, ddo_fake, cond, hp, ddo_alpha, ddo_beta, batch_gpu=batch_gpu, seed=seed,
                dry_run=dry_run, edm2_root=edm2_root)
