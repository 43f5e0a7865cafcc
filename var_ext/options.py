"""Command-line options and loading shared by `var_ext.train` and `var_ext.generate`: which VQVAE + VAR to build
(upstream's shapes) and from which files, and the process group under torchrun."""

from __future__ import annotations

import torch

from ddo_patch.distributed import device_for_this_rank, join_from_env
from var_ext import checkpoints, models


def add_model_options(parser, weights: str, weights_help: str):
    """The model options; `weights` is the option naming the VAR state dict (`--ref` to train, `--net` to sample),
    as edm2_ext names its pretrained/reference snapshot and the network it samples."""
    g = parser.add_argument_group('models')
    g.add_argument('--var-root', metavar='DIR', help='FoundationVision/VAR checkout (default: $VAR_ROOT, then the ddo-patch cache)')
    g.add_argument(weights, metavar='FILE', required=True, help=weights_help)
    g.add_argument('--depth', metavar='INT', type=int, default=16, help='VAR depth; width = 64 * depth, as upstream (default: %(default)s)')
    g.add_argument('--vae', metavar='FILE', default=checkpoints.OFFICIAL_VAE, help='VQVAE state dict, never downloaded (default: %(default)s)')
    g.add_argument('--patch-nums', metavar='LIST', default='1_2_3_4_5_6_8_10_13_16', help='token pyramid, as upstream --pn (default: %(default)s)')
    g.add_argument('--num-classes', metavar='INT', type=int, default=1000, help='number of classes (default: %(default)s)')
    g.add_argument('--vae-vocab', metavar='INT', type=int, default=4096, help='VQVAE codebook size (default: %(default)s)')
    g.add_argument('--vae-ch', metavar='INT', type=int, default=160, help='VQVAE base width (default: %(default)s)')
    g.add_argument('--vae-z', metavar='INT', type=int, default=32, help='VQVAE latent channels (default: %(default)s)')
    return g


def load_pretrained(args, weights, device):
    """(config, vqvae, var) with both weight files checked against the flags before loading strictly."""
    checkpoints.require_file(args.vae, 'VQVAE')            # fail before building a large model
    checkpoints.require_file(weights, 'VAR checkpoint')
    cfg = models.VARConfig(depth=args.depth, patch_nums=models.parse_patch_nums(args.patch_nums), num_classes=args.num_classes,
                           vae_vocab=args.vae_vocab, vae_z_channels=args.vae_z, vae_ch=args.vae_ch)
    vae, var = models.build(cfg, device)
    checkpoints.load_vae(vae, args.vae, f'--vae-vocab {cfg.vae_vocab} --vae-ch {cfg.vae_ch} --vae-z {cfg.vae_z_channels}')
    checkpoints.load_var(var, weights, f'--depth {cfg.depth} --patch-nums {args.patch_nums} --num-classes {cfg.num_classes}')
    return cfg, vae, var


def init_distributed():
    """(rank, world_size, device): this process's GPU (or the CPU), in the group torchrun describes (one alone)."""
    device = device_for_this_rank()
    rank, world_size = join_from_env(device)
    return rank, world_size, device


AMP_DTYPES = {'fp32': None, 'fp16': torch.float16, 'bf16': torch.bfloat16}
# Upstream VAR's own precision (train.py --fp16=1, its sampling demo): under fp16, DDO's log-ratio
# log p_theta - log p_ref is rounded about 10x less than under bf16 (benchmarks/var_amp_delta.py, docs/var.md).
DEFAULT_AMP = 'fp16'


def add_amp_option(group):
    group.add_argument('--amp', choices=list(AMP_DTYPES), default=DEFAULT_AMP,
                       help='autocast dtype on CUDA (bf16 rounds DDO\'s log-ratio ~10x more, see docs/var.md); '
                            'CPU runs fp32 (default: %(default)s)')


def autocast(device, amp: str):
    """Autocast on CUDA with the chosen dtype; a no-op context on CPU or for fp32."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast('cuda', dtype=dtype, enabled=device.type == 'cuda' and dtype is not None)
