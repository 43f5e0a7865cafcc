"""What upstream VAR's `train.py` calls once `ddo-patch apply` has patched it (patches/var).

    torchrun --nproc_per_node=8 train.py --ddo=True --var_ckpt=var_d16.pth --vae_ckpt=vae_ch160v4096z32.pth \\
        --depth=16 --data_path=/path/to/imagenet --ddo_alpha=50 --ddo_beta=0.02 --iterations 80

runs the same round as `python -m var_ext.train`. Upstream's model and data options are mapped (`--var_ckpt`,
`--vae_ckpt`, `--depth`, `--pn`, `--data_path`, `--local_out_dir_path`, `--seed`, `--workers`, `--wp0`,
`--wpe`); options that VAR's parser does not know (`--iterations`, `--global-batch`, `--lr`, `--metric`, ...)
reach var_ext.train as written. VAR's pretraining optimisation options hold pretraining defaults (batch
768, lr 1e-4 * batch / 256, 250 epochs), so they are refused with the var_ext option to use instead.
"""

from __future__ import annotations

import sys

from ddo_patch.distributed import end_process
from ddo_patch.errors import DDOPatchError, exit_on_user_error
from var_ext import train

# upstream pretraining option -> the var_ext.train option that sets the same thing for a DDO round
PRETRAINING_OPTIONS = {'bs': '--global-batch', 'tblr': '--lr', 'tlr': '--lr', 'ep': '--iterations', 'wp': '--warmup',
                       'sche': '--schedule', 'twd': '--wd', 'twde': '--wd', 'tclip': '--grad-clip', 'fp16': '--amp',
                       'ac': '--batch-gpu'}
PATCH_NUMS = {'256': '1_2_3_4_5_6_8_10_13_16', '512': '1_2_3_4_6_9_13_18_24_32'}   # upstream's --pn shorthands
UNSET_DATA_PATH = '/path/to/imagenet'


def _given(argv) -> set:
    """Option names on a command line, as VAR's parser spells them (`--bs=8` and `--bs 8` both give 'bs')."""
    return {arg[2:].split('=', 1)[0] for arg in argv if arg.startswith('--')}


def var_ext_argv(args, argv) -> list:
    """The var_ext.train command line for a parsed upstream `Args` and the raw command line it came from."""
    refused = sorted(_given(argv) & set(PRETRAINING_OPTIONS))
    if refused:
        raise DDOPatchError('with --ddo=True, ' + ', '.join(f'use {PRETRAINING_OPTIONS[n]} instead of --{n}' for n in refused)
                            + ' (VAR\'s own options hold pretraining values)')
    if not args.var_ckpt:
        raise DDOPatchError('--ddo=True finetunes a pretrained VAR: give --var_ckpt (e.g. var_d16.pth)')
    out = ['--ref', args.var_ckpt, '--depth', str(args.depth), '--patch-nums', PATCH_NUMS.get(args.pn, args.pn),
           '--outdir', args.local_out_dir_path, '--ddo-alpha', str(args.ddo_alpha), '--ddo-beta', str(args.ddo_beta),
           '--wp0', str(args.wp0), '--wpe', str(args.wpe)]
    if args.vae_ckpt:
        out += ['--vae', args.vae_ckpt]
    if args.data_path != UNSET_DATA_PATH:
        out += ['--data', args.data_path]
    if args.seed is not None:
        out += ['--seed', str(args.seed)]
    if args.workers != 0:   # upstream's 0 (its comment: "auto") keeps var_ext's automatic default; -1 (none) -> 0
        out += ['--workers', str(max(args.workers, 0))]
    return out + list(args.extra_args)


@exit_on_user_error
def train_ddo(args, var_root):
    """Body of the patched `train.py --ddo=True`: one DDO round by var_ext.train; ends the process when it is done."""
    train.main(['--var-root', var_root, *var_ext_argv(args, sys.argv[1:])])
    end_process()  # leave the process group as `python -m var_ext.train` does
