"""Randomly initialised VQVAE + VAR of a chosen size for the VAR benchmarks (timings do not depend on weights)."""

import torch

from var_ext import models


def add_size_options(parser, depth, batch, vae_ch=160, timed=True):
    parser.add_argument('--var-root', metavar='DIR', help='FoundationVision/VAR checkout (default: $VAR_ROOT, then the cache)')
    parser.add_argument('--depth', metavar='INT', type=int, default=depth, help='VAR depth, width 64 * depth (default: %(default)s)')
    parser.add_argument('--batch', metavar='INT', type=int, default=batch, help='samples per step (default: %(default)s)')
    parser.add_argument('--patch-nums', metavar='LIST', default='1_2_3_4_5_6_8_10_13_16', help='token pyramid (default: %(default)s)')
    parser.add_argument('--vae-ch', metavar='INT', type=int, default=vae_ch, help='VQVAE width (default: %(default)s; 160 is the official one)')
    if timed:
        parser.add_argument('--repeats', metavar='INT', type=int, default=3, help='timed repetitions, median reported (default: %(default)s)')
    parser.add_argument('--threads', metavar='INT', type=int, help='torch CPU threads (default: torch\'s choice)')


def random_models(args, device):
    if args.threads:
        torch.set_num_threads(args.threads)
    models.activate_upstream(args.var_root)
    torch.manual_seed(0)
    cfg = models.VARConfig(depth=args.depth, patch_nums=models.parse_patch_nums(args.patch_nums), vae_ch=args.vae_ch)
    vae, var = models.build(cfg, device)
    for module in vae.modules():   # upstream leaves the VQVAE uninitialised; give it finite weights
        if module is not vae and hasattr(module, 'reset_parameters'):
            module.reset_parameters()
    return cfg, vae, var


def describe(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU, {torch.get_num_threads()} torch threads'
