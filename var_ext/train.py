"""DDO finetuning of a pretrained VAR: one round of online self-play (section 5.3, appendix C).

    torchrun --nproc_per_node=8 -m var_ext.train --var-root VAR --vae vae_ch160v4096z32.pth \\
        --ref var_d16.pth --depth 16 --data /path/to/imagenet --outdir runs/d16-round1 \\
        --metric my_fid:fid50k --ddo-alpha 50 --ddo-beta 0.02

Writes to --outdir: `var-ddo-last.pth` and `var-ddo-best.pth` (plain VAR state dicts, loadable with
upstream `var.load_state_dict(..., strict=True)`), `training-state.pth` (optimiser and iteration, to
resume: rerun the same command), `training_options.json`, `log.jsonl` (the loss terms and discriminator
accuracies under the names edm2_ext.train logs them in stats.jsonl, samples/s, lr) and `metrics.jsonl`
(each evaluation: one score per guidance scale of `--eval-cfg`, and the `score` of `--select-cfg`, which
selects; the paper keeps the best of "guidance-free / a moderate CFG scale" every 4 iterations). With `tensorboard`
installed (`pip install "ddo-patch[tensorboard]"`), the same scalars also go to `tb/` under upstream VAR's tag style
(`AR_iter_loss/L`, `AR_iter_ddo/delta_real`, `AR_opt_lr/lr_max/sche_tlr`, `AR_eval/cfg=0`); the JSON lines stay the
record. The options mirror edm2_ext.train's: `--ref` the
pretrained model (initialises the trained and the frozen reference VAR), `--slice` a partial run,
`--batch-gpu` a memory-bound per-rank batch, `--dry-run`. Runs on CPU (gloo under torchrun) for tests;
AMP only on CUDA. SIGUSR1 or SIGTERM (a cluster's preemption or time-limit warning) ends the run after the
iteration in progress, with its training state written, and exit status 75: rerun the same command to resume.

`--objective mle` is the matched control: the same run (init, optimiser, schedule, batches, evaluation,
selection, files) with upstream's token cross-entropy, the labels dropped at `--label-drop` (VAR pretrains
with 0.1), and no reference model or samples. Whatever DDO gains beyond it is the objective's, not the
finetune's (a low, annealed learning rate and best-of-N selection improve a model by themselves).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import torch
import torch.distributed as tdist

from ddo_patch.distributed import barrier, run_entry_point
from ddo_patch.errors import DDOPatchError, exit_on_user_error
from ddo_patch.losses import OBJECTIVES, check_hyperparameters
from ddo_patch.preemption import EXIT_INTERRUPTED, StopRequest
from var_ext import checkpoints, datasets, models, options, run_files
from var_ext.evaluator import Evaluator
from var_ext.options import add_model_options, init_distributed, load_pretrained
from var_ext.trainer import TIMINGS, build_optimizer, make_trainer

AMP_MODES = {'fp32': 0, 'fp16': 1, 'bf16': 2}   # upstream's --fp16 values


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m var_ext.train', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p, '--ref', 'pretrained VAR state dict: initialises the trained and the frozen reference VAR '
                                '(e.g. var_d16.pth, or var-ddo-best.pth of the previous round)')
    g = p.add_argument_group('data')
    g.add_argument('--data', metavar='DIR', help='ImageFolder root with train/ and val/ (upstream pipeline; needs torchvision)')
    g.add_argument('--dataset', metavar='MODULE:FN', help='instead of --data: FN(resolution) -> dataset of (image or tokens, label)')
    g.add_argument('--workers', metavar='INT', type=int, default=datasets.default_workers(),
                   help='data loader processes per rank (default: min(4, CPUs per process on this machine - 1), here %(default)s)')
    g = p.add_argument_group('DDO (appendix C)')
    g.add_argument('--objective', choices=OBJECTIVES, default='ddo',
                   help='ddo, or mle: the matched control, this run with upstream\'s token cross-entropy (labels dropped at '
                        '--label-drop) instead of the DDO loss, no reference samples (default: %(default)s)')
    g.add_argument('--ddo-alpha', metavar='FLOAT', type=float, default=50.0, help='weight of the reference-sample term; paper sweeps 10-100 (default: %(default)s)')
    g.add_argument('--ddo-beta', metavar='FLOAT', type=float, default=0.02, help='discriminator temperature (default: %(default)s)')
    g.add_argument('--label-drop', metavar='P', type=float, default=0.5, help='label dropout, shared by target and reference; alpha=0 there (default: %(default)s)')
    g = p.add_argument_group('optimisation (VAR\'s schedule)')
    g.add_argument('--iterations', metavar='INT', type=int, default=80, help='iterations in this round (default: %(default)s)')
    g.add_argument('--global-batch', metavar='INT', type=int, default=1024, help='real samples per iteration over all ranks; as many fakes are drawn (default: %(default)s)')
    g.add_argument('--batch-gpu', metavar='INT', type=int, default=0, help='limit the batch per rank and pass (gradient accumulation, same update); 0 = no limit (default: %(default)s)')
    g.add_argument('--lr', metavar='FLOAT', type=float, default=4e-6, help='peak learning rate, used as is (not scaled by batch) (default: %(default)s)')
    g.add_argument('--schedule', metavar='NAME', default='lin0', help='upstream lr schedule (lin0, cos, lin, ...) (default: %(default)s)')
    g.add_argument('--warmup', metavar='FRAC', type=float, default=0.02, help='warm-up as a fraction of --iterations, as upstream wp = ep/50 (default: %(default)s)')
    g.add_argument('--wp0', metavar='FRAC', type=float, default=0.005, help='lr at the start of warm-up, relative to peak (default: %(default)s)')
    g.add_argument('--wpe', metavar='FRAC', type=float, default=0.01, help='lr at the end, relative to peak (default: %(default)s)')
    g.add_argument('--wd', metavar='FLOAT', type=float, default=0.05, help='AdamW weight decay (default: %(default)s)')
    g.add_argument('--grad-clip', metavar='FLOAT', type=float, default=2.0, help='gradient-norm clip, <=0 off (default: %(default)s)')
    options.add_amp_option(g)
    g.add_argument('--max-nonfinite', metavar='INT', type=int, default=20,
                   help='stop after more than INT consecutive steps with a non-finite loss or gradient norm (default: %(default)s)')
    g.add_argument('--seed', metavar='INT', type=int, default=0, help='data order, reference samples and dropout masks (default: %(default)s)')
    g = p.add_argument_group('evaluation and output')
    g.add_argument('--outdir', metavar='DIR', required=True, help='run directory; an existing run there is resumed')
    g.add_argument('--metric', metavar='MODULE:FN', help='FN(images uint8 NHWC, labels) -> float, lower is better (token pyramids int64 [N, L] instead if FN.takes_tokens); without it only the last checkpoint is kept')
    g.add_argument('--eval-every', metavar='INT', type=int, default=4, help='evaluate every INT iterations, and at 0 and the end (default: %(default)s)')
    g.add_argument('--eval-samples', metavar='INT', type=int, default=50000, help='class-balanced images per evaluation (default: %(default)s)')
    g.add_argument('--eval-cfg', metavar='LIST', default=run_files.format_scales(run_files.DEFAULT_EVAL_CFG),
                   help='guidance scales to evaluate at, e.g. 0,1.5; 0 = guidance-free (default: %(default)s)')
    g.add_argument('--select-cfg', metavar='FLOAT', type=float, default=run_files.DEFAULT_SELECT_CFG,
                   help='the evaluated scale whose score picks the best checkpoint (default: %(default)s)')
    g.add_argument('--eval-batch', metavar='INT', type=int, default=64, help='images per sampling batch and rank (default: %(default)s)')
    g.add_argument('--no-initial-eval', action='store_true', help='do not evaluate the starting model (the round manager scores the reference once per round)')
    g.add_argument('--log-every', metavar='INT', type=int, default=1, help='log every INT iterations (default: %(default)s)')
    g.add_argument('--slice', metavar='INT', type=int, help='leave after INT iterations of this invocation (job time limits); rerun to resume')
    g.add_argument('--stop-at', metavar='INT', type=int, help='leave once iteration INT is done (a rung of a successive-halving sweep); rerun with a larger one, or none, to continue')
    g.add_argument('-n', '--dry-run', action='store_true', help='check the inputs, print the training options and the expected per-GPU peak memory, and exit')
    return p.parse_args(argv)


def validate(args, world_size):
    """Everything that can be checked before a file is written."""
    if args.objective == 'ddo':
        check_hyperparameters(args.ddo_alpha, args.ddo_beta)
    if args.global_batch < 1 or args.global_batch % world_size:
        raise DDOPatchError(f'--global-batch {args.global_batch} is not divisible by the world size {world_size}; '
                            f'use a multiple of {world_size}')
    per_rank = args.global_batch // world_size
    if args.batch_gpu < 0 or (0 < args.batch_gpu < per_rank and per_rank % args.batch_gpu):
        raise DDOPatchError(f'--batch-gpu {args.batch_gpu} must divide the per-rank batch {per_rank} (or be 0: no limit)')
    if args.iterations < 2:
        raise DDOPatchError(f'--iterations must be >= 2 (upstream\'s schedule divides by iterations - 1), got {args.iterations}')
    if args.eval_every < 1 or args.log_every < 1:
        raise DDOPatchError('--eval-every and --log-every must be >= 1')
    if not args.data and not args.dataset:
        raise DDOPatchError('give --data (ImageFolder root) or --dataset module:function')
    run_files.check_selected(run_files.parse_scales(args.eval_cfg), args.select_cfg, '--eval-cfg/--select-cfg')


def significant(x: float, digits: int = 3) -> str:
    """`x` with at least `digits` significant digits and no exponent: 0.0123, 12.3, 1234 (never '0.0')."""
    if x == 0 or not math.isfinite(x):
        return f'{x:g}'
    return f'{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}'


def average_across_ranks(values: dict, world_size: int, device) -> dict:
    if world_size == 1:
        return values
    packed = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    tdist.all_reduce(packed)
    return dict(zip(values, (packed / world_size).tolist()))


def accumulation_rounds(args, world_size) -> int:
    """Micro-batches per rank and update, as EDM2 derives them from --batch-gpu."""
    per_rank = args.global_batch // world_size
    return per_rank // args.batch_gpu if 0 < args.batch_gpu < per_rank else 1


def merge_micro_logs(logs):
    """Means over micro-batches, summed times, the gradient norm and loss scale of the (last) stepping micro-batch,
    and whether any micro-batch was not finite."""
    def mean(values):   # the fake accuracy is NaN on a micro-batch whose labels were all dropped
        finite = [v for v in values if v == v]
        return sum(finite) / len(finite) if finite else float('nan')
    merged = {k: mean([log[k] for log in logs]) for k in logs[0]}
    for k in TIMINGS:
        merged[k] *= len(logs)
    merged.update({k: logs[-1][k] for k in ('Loss/grad_norm', 'Faults/loss_scale') if k in logs[-1]})
    merged['Faults/nonfinite'] = max(log['Faults/nonfinite'] for log in logs)
    return merged


def expected_memory(args, model_cfg, dataset, world_size):
    """`var_ext.memory`'s expected per-GPU peak at the micro-batch of these options, with the rank's images
    tokenised at once when the data set gives images (not token pyramids)."""
    from var_ext.memory import step_memory
    per_rank = args.global_batch // world_size
    images = dataset[0][0].is_floating_point()
    return step_memory(model_cfg, per_rank // accumulation_rounds(args, world_size), per_rank if images else None,
                       ddp=world_size > 1, objective=args.objective)


def build(args, device, world_size):
    """Models, optimiser and trainer; raises before anything is written if a file does not fit the flags."""
    model_cfg, vae, var = load_pretrained(args, args.ref, device)
    ref = models.frozen_copy(var) if args.objective == 'ddo' else None
    var.train()
    ddp = var
    if world_size > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(var, device_ids=[device.index] if device.type == 'cuda' else None,
                                                        broadcast_buffers=False)
    amp = AMP_MODES[args.amp] if device.type == 'cuda' else 0
    opt = build_optimizer(var, lr=args.lr, weight_decay=args.wd, grad_clip=args.grad_clip, mixed_precision=amp,
                          grad_accum=accumulation_rounds(args, world_size))
    rank = tdist.get_rank() if world_size > 1 else 0
    return model_cfg, make_trainer(vae, var, ref, ddp, opt, args.ddo_alpha, args.ddo_beta, args.label_drop,
                                   seed=args.seed, rank=rank, objective=args.objective)


def tensorboard_writer(outdir, start):
    """A SummaryWriter into outdir/tb, or None when tensorboard is not installed (log.jsonl is the record either way).
    On resume at iteration `start`, `purge_step` hides what an interrupted run had logged after it (work that is redone)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:   # what torch raises when the tensorboard package is missing
        return None
    return SummaryWriter(os.path.join(outdir, run_files.TENSORBOARD), purge_step=start + 1 if start else None)


class Run:
    """The run directory: logs, checkpoints and the resumable state (rank 0 writes). log.jsonl and metrics.jsonl are
    the record; their scalars also go to TensorBoard under upstream VAR's tags when it is installed."""

    def __init__(self, outdir, rank, args):
        self.outdir, self.rank, self.args = outdir, rank, args
        self.state_path = os.path.join(outdir, run_files.STATE)
        self.start = 0            # the iteration this invocation resumes at
        self.tensorboard = None   # made with the first record, like every other file

    def _create(self):
        """Made on the first write, after every input has been checked."""
        os.makedirs(self.outdir, exist_ok=True)
        if not os.path.isfile(self.path(run_files.OPTIONS)):
            with open(self.path(run_files.OPTIONS), 'w') as f:
                json.dump(vars(self.args), f, indent=1)
        if self.tensorboard is None:
            self.tensorboard = tensorboard_writer(self.outdir, self.start) or False
            if not self.tensorboard:
                print('[var_ext.train] tensorboard is not installed: log.jsonl and metrics.jsonl only '
                      '(pip install "ddo-patch[tensorboard]" for TensorBoard scalars)', flush=True)

    def path(self, name):
        return os.path.join(self.outdir, name)

    def append(self, name, record):
        if self.rank == 0:
            self._create()
            with open(self.path(name), 'a') as f:
                f.write(json.dumps(record) + '\n')
            if self.tensorboard:
                for key, value in record.items():
                    if key not in ('iteration', 'best'):
                        self.tensorboard.add_scalar(run_files.tensorboard_tag(key, name == run_files.METRICS), value,
                                                    record['iteration'])

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()

    def save(self, trainer, iteration, best, also_best=False):
        if self.rank != 0:
            return
        self._create()
        weights = trainer.var_wo_ddp.state_dict()
        checkpoints.save_atomic(weights, self.path(run_files.LAST))
        if also_best:
            checkpoints.save_atomic(weights, self.path(run_files.BEST))
        checkpoints.save_atomic({'iteration': iteration, 'best': best, 'trainer': trainer.state_dict()}, self.state_path)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    models.activate_upstream(args.var_root)
    rank, world_size, device = init_distributed()
    validate(args, world_size)
    model_cfg, trainer = build(args, device, world_size)
    dataset = datasets.build_dataset(args.data, args.dataset, model_cfg.resolution)
    metric = datasets.resolve(args.metric, '--metric') if args.metric else None
    grad_accum = accumulation_rounds(args, world_size)
    if rank == 0:
        print(json.dumps(dict(vars(args), device=str(device), world_size=world_size, accumulation_rounds=grad_accum), indent=2), flush=True)
    if args.dry_run:
        if rank == 0:
            print(expected_memory(args, model_cfg, dataset, world_size).describe(), flush=True)
        print('Dry run; exiting.', flush=True)
        return 0
    with StopRequest(device) as stop:
        return train(args, rank, world_size, device, model_cfg, trainer, dataset, metric, stop)


def train(args, rank, world_size, device, model_cfg, trainer, dataset, metric, stop):
    """The round itself, from the run directory's state if there is one; returns the last iteration done."""
    grad_accum = accumulation_rounds(args, world_size)
    run = Run(args.outdir, rank, args)
    start, best = 0, None
    if os.path.isfile(run.state_path):
        state = torch.load(run.state_path, map_location='cpu', weights_only=False)
        trainer.load_state_dict(state['trainer'])
        start, best = state['iteration'], state['best']
        print(f'[var_ext.train] resuming {args.outdir} at iteration {start}/{args.iterations}', flush=True)
    run.start = start

    loader = torch.utils.data.DataLoader(dataset, num_workers=args.workers, pin_memory=device.type == 'cuda',
                                         batch_sampler=datasets.ResumableBatchSampler(len(dataset), args.global_batch, rank, world_size, args.seed, start))
    evaluator = None
    if metric is not None:
        evaluator = Evaluator(metric, range(args.eval_samples), run_files.parse_scales(args.eval_cfg), args.outdir,
                              args.eval_batch, rank, world_size)
    from utils import lr_control
    score_key = run_files.score_key(args.select_cfg)

    def evaluate(iteration):
        nonlocal best
        scores = evaluator(trainer.var_wo_ddp, trainer.base.var_opt.amp_ctx)
        improved = best is None or scores[score_key] < best['score']
        if improved:
            best = {'iteration': iteration, 'score': scores[score_key], 'by': score_key}
        run.append(run_files.METRICS, {'iteration': iteration, **scores, 'score': scores[score_key], 'best': best['iteration']})
        if rank == 0:
            print(f'[eval] it {iteration}: ' + ', '.join(f'{k} {v:.4g}' for k, v in scores.items()) +
                  f' (best: it {best["iteration"]})', flush=True)
        return improved

    batches = iter(loader)
    first = next(batches)
    trainer.check_labels(first[1])   # a bad dataset fails before anything is written

    if evaluator is not None and best is None and not args.no_initial_eval:
        evaluate(0)   # the reference itself: a round may not improve on it
        run.save(trainer, 0, best, also_best=True)
    iteration, done_here, consecutive, nonfinite_since_log = start, 0, 0, 0
    for images_or_tokens, labels in itertools.chain([first], batches):
        if iteration >= args.iterations or (args.slice is not None and done_here >= args.slice) or \
                (args.stop_at is not None and iteration >= args.stop_at):
            break
        if stop.due():   # SIGUSR1/SIGTERM on any rank: keep every finished iteration, leave with "resume me"
            run.save(trainer, iteration, best)
            run.close()
            barrier()
            sys.exit(EXIT_INTERRUPTED)
        wp_it = args.warmup * args.iterations
        _, lr, _, _ = lr_control.lr_wd_annealing(args.schedule, trainer.base.var_opt.optimizer, args.lr, args.wd, args.wd,
                                                 iteration, wp_it, args.iterations, wp0=args.wp0, wpe=args.wpe)
        began = time.perf_counter()   # samples/s counts tokenising, reference sampling and the update
        labels = labels.to(device, non_blocking=True)
        x = images_or_tokens.to(device, non_blocking=True)
        real = datasets.split_scales(x, model_cfg.patch_nums) if not x.is_floating_point() else trainer.real_tokens(x)
        micro_logs = []
        for micro, (micro_labels, *micro_real) in enumerate(zip(labels.chunk(grad_accum), *(r.chunk(grad_accum) for r in real))):
            micro_logs.append(trainer.step(micro_labels, micro_real, iteration, micro, stepping=micro == grad_accum - 1))
        log = merge_micro_logs(micro_logs)
        seconds = time.perf_counter() - began
        iteration, done_here = iteration + 1, done_here + 1
        # Counted, not hidden: a step whose loss or gradient norm is not finite (the same on every rank: the gradients
        # are all-reduced). fp16 skips it (upstream's scaler); fp32 has stepped on it, and what follows will be too.
        consecutive = consecutive + 1 if log.pop('Faults/nonfinite') else 0
        nonfinite_since_log += bool(consecutive)
        if consecutive > args.max_nonfinite:
            raise DDOPatchError(f'{consecutive} consecutive steps had a non-finite loss or gradient norm (the last: iteration '
                                f'{iteration}); the run diverged: lower --lr (or raise --max-nonfinite to let fp16 recover)')
        if iteration % args.log_every == 0 or iteration == args.iterations:
            stats = average_across_ranks(log, world_size, device)
            record = {'iteration': iteration, 'Progress/lr': lr, **stats, 'Faults/nonfinite_steps': nonfinite_since_log,
                      'Timing/samples_per_s': args.global_batch / seconds}
            nonfinite_since_log = 0
            run.append(run_files.LOG, record)
            if rank == 0:
                terms = ' (mle)' if args.objective == 'mle' else (
                    f' (real {stats["DDO/loss_real"]:.4f} fake {stats["DDO/loss_fake"]:.4f}) acc real '
                    f'{stats["DDO/accuracy_real"]:.3f} fake {stats["DDO/accuracy_fake"]:.3f}')
                print(f'[it {iteration}/{args.iterations}] loss {stats["Loss/loss"]:.4f}{terms} lr {lr:.3g} '
                      f'{significant(record["Timing/samples_per_s"])} samples/s '
                      f'(generate {stats[TIMINGS[0]]:.2f}s, train {stats[TIMINGS[1]]:.2f}s)', flush=True)
        improved = False
        if evaluator is not None and (iteration % args.eval_every == 0 or iteration == args.iterations):
            improved = evaluate(iteration)
        if improved or iteration % args.eval_every == 0 or iteration == args.iterations:
            run.save(trainer, iteration, best, also_best=improved)
    if done_here and iteration % args.eval_every and iteration != args.iterations:
        run.save(trainer, iteration, best)   # stopped early (--slice, --stop-at): keep what was done
    run.close()
    barrier()
    return iteration


if __name__ == '__main__':
    run_entry_point(main)
