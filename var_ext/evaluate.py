"""Score one VAR checkpoint with a metric of yours, as `var_ext.train` scores its checkpoints during a round.

    torchrun --nproc_per_node=8 -m var_ext.evaluate --net var_d16.pth --depth 16 --vae vae_ch160v4096z32.pth \\
        --metric my_fid:fid50k --seeds 0-49999 --cfg 0,1.5 --dest eval.json

The images of seed s have class s % num_classes and their own generator (`var_ext.evaluator`), so the same
seeds give the same images whatever the number of processes. Writes --dest (JSON): the checkpoint, the
seeds, one score per guidance scale (`cfg=0`, `cfg=1.5`, ...) and `score`, the one of `--select-cfg`
(as var_ext.train's --eval-cfg and --select-cfg). The round manager runs it once per round on the reference.
"""

from __future__ import annotations

import argparse
import json
import os

from ddo_patch.distributed import run_entry_point
from ddo_patch.errors import DDOPatchError, exit_on_user_error
from ddo_patch.files import write_atomic
from ddo_patch.seeds import parse_seeds
from var_ext import datasets, models, run_files
from var_ext.evaluator import Evaluator
from var_ext.options import add_amp_option, add_model_options, autocast, init_distributed, load_pretrained


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m var_ext.evaluate', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p, '--net', 'VAR state dict to score (e.g. var_d16.pth, or var-ddo-best.pth of a round)')
    g = p.add_argument_group('evaluation')
    g.add_argument('--metric', metavar='MODULE:FN', required=True, help='FN(images uint8 NHWC, labels) -> float, lower is better (token pyramids int64 [N, L] instead if FN.takes_tokens)')
    g.add_argument('--seeds', metavar='LIST', default='0-49999', help='sampling seeds, e.g. 0-49999 (default: %(default)s)')
    g.add_argument('--cfg', metavar='LIST', default='0', help='guidance scales, e.g. 0,1.5; 0 = guidance-free (default: %(default)s)')
    g.add_argument('--select-cfg', metavar='FLOAT', type=float, default=run_files.DEFAULT_SELECT_CFG,
                   help='the scale whose score is `score` (default: %(default)s)')
    g.add_argument('--batch', metavar='INT', type=int, default=64, help='images per sampling batch and rank (default: %(default)s)')
    add_amp_option(g)
    g.add_argument('--dest', metavar='JSON', required=True, help='where the scores go')
    return p.parse_args(argv)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    models.activate_upstream(args.var_root)
    if args.batch < 1:
        raise DDOPatchError(f'--batch must be >= 1, got {args.batch}')
    scales = run_files.parse_scales(args.cfg)
    key = run_files.check_selected(scales, args.select_cfg, '--cfg/--select-cfg')
    seeds = parse_seeds(args.seeds)
    metric = datasets.resolve(args.metric, '--metric')
    rank, world_size, device = init_distributed()
    _, _, var = load_pretrained(args, args.net, device)
    shards = f'{args.dest}.shards'
    scores = Evaluator(metric, seeds, scales, shards, args.batch, rank, world_size)(var, autocast(device, args.amp))
    if rank == 0:
        os.rmdir(shards)
        report = dict(net=args.net, seeds=args.seeds, **scores, score=scores[key], by=key)
        write_atomic(args.dest, lambda f: f.write((json.dumps(report, indent=1) + '\n').encode()))
        print('[var_ext.evaluate] ' + ', '.join(f'{k} {v:.4g}' for k, v in scores.items()) + f' -> {args.dest}', flush=True)


if __name__ == '__main__':
    run_entry_point(main)
