"""Does DDO improve a VAR? The VAR route in a world with exact likelihoods (`var_ext.exact`), on a CPU.

    ddo-patch fetch var
    python benchmarks/var_exact.py --outdir runs/var-exact      # rerun the same command to resume after any stop

Stages, each cached in --outdir (a rerun skips what is done):
  1. world      a depth-3 teacher VAR with sharpened, strongly class-dependent conditionals is p_data; its exact
                samples (no top-k/top-p, no guidance) are the training set and a disjoint held-out set
  2. MLE        a depth-1 student trained on the training set by MLE with VAR's 10 % label dropout, a checkpoint
                and a held-out NLL every --curve-every steps: the curve shows that it has converged
  3. rounds     two rounds of `python -m var_ext.train` (round 2 starts from, and is referenced by, round 1's best
                checkpoint), each selecting its best checkpoint by the trainer's own `--metric` (the teacher NLL of
                guidance-free samples, on seeds 0..N-1, disjoint from the report seeds); alongside them, in a
                worker process, the control: the MLE run continued (same optimiser state and learning rate) for as
                many real samples as the rounds train on
  4. report     each model at each guidance scale on the report seeds: precision-like (teacher log-likelihood of
                its samples), recall-like (its NLL of the held-out teacher samples under the sampler of that scale),
                coverage (the entropy of that sampler) and the two exact KL divergences between the sampler and
                p_data, each a mean of per-sample values with its standard error; the metric's own noise (the MLE
                student on a second report-size seed set); var_exact.md, var_exact.json, var_exact.png

Hyperparameters were chosen on a fourth seed set (30,000,000 onwards), disjoint from the selection, report and noise seeds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time

import torch

from ddo_patch.files import write_atomic
from var_ext import exact, models
from var_ext.trainer import parameter_groups

WORLD = exact.World()
# Sizes: `full` is the documented run; `quick` is the suite's reduced run (tests/test_var_exact.py).
SIZES = {
    'full': dict(world=WORLD, mle_steps=3000, curve_every=250, batch=256, lr=3e-3, report=2000, select=2000,
                 cfgs=[0, 0.5, 1, 1.5, 2], rounds=2,
                 ddo=dict(iterations=160, global_batch=512, lr=5e-4, alpha=1.5, beta=1, label_drop=0.5, eval_every=16)),
    'quick': dict(world=dataclasses.replace(WORLD, num_classes=10, train_size=2000, heldout_size=1000), mle_steps=200, curve_every=200,
                  batch=128, lr=3e-3, report=2000, select=200, cfgs=[0], rounds=1,
                  ddo=dict(iterations=16, global_batch=256, lr=5e-4, alpha=3, beta=1, label_drop=0.5, eval_every=4)),
}
REPORT_SEEDS, NOISE_SEEDS = 10_000_000, 20_000_000   # the first of each model-sampling seed set (selection: 0..N-1)


def log(message):
    print(f'[var_exact {time.strftime("%H:%M:%S")}] {message}', flush=True)


class Cache:
    """Results by key in OUT/scores.json, written after each one, so a rerun computes nothing twice."""

    def __init__(self, path):
        self.path = path
        self.data = {}
        if os.path.isfile(path):
            with open(path) as f:
                self.data = json.load(f)

    def fill(self, pool, jobs: dict) -> dict:
        """Computes the missing entries of {key: (function, *args)} in the worker pool, storing each as it finishes."""
        futures = {pool.submit(*job): key for key, job in jobs.items() if key not in self.data}
        for future in concurrent.futures.as_completed(futures):
            self.data[futures[future]] = future.result()
            write_atomic(self.path, lambda f: f.write(json.dumps(self.data, indent=1).encode()))
        return {key: self.data[key] for key in jobs}


def checkpoint(run_dir, step):
    return os.path.join(run_dir, f'student-{step:06d}.pth')


def mle(world_dir, run_dir, world, size, last, every):
    """The student's MLE run to step `last`, a checkpoint every `every` steps; resumes from its latest state."""
    state_path = os.path.join(run_dir, 'training-state.pth')
    if os.path.isfile(checkpoint(run_dir, last)):
        return checkpoint(run_dir, last)
    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(world.seed + 1)
    vae, var = models.build(world.config(world.student_depth), 'cpu')
    vae.load_state_dict(torch.load(os.path.join(world_dir, exact.VAE)), strict=True)
    optimizer = torch.optim.AdamW(parameter_groups(var)[2], lr=size['lr'], betas=(0.9, 0.95), weight_decay=0.05)
    first = 0
    if os.path.isfile(state_path):
        state = torch.load(state_path, weights_only=False)
        var.load_state_dict(state['var'])
        optimizer.load_state_dict(state['optimizer'])
        first = state['step']

    def save(step):
        torch.save(var.state_dict(), checkpoint(run_dir, step))
        torch.save({'var': var.state_dict(), 'optimizer': optimizer.state_dict(), 'step': step}, state_path)

    labels, tokens = exact.load_set(world_dir, exact.TRAIN)
    exact.train_mle(var, optimizer, labels, tokens, first, last, size['batch'], world.seed, every, save)
    return checkpoint(run_dir, last)


def ddo_round(out, world_dir, world, size, ref, run_dir, seed):
    """One `python -m var_ext.train` round from `ref`; its best checkpoint (selected by the teacher NLL at cfg 0)."""
    ddo = size['ddo']
    argv = ['-m', 'var_ext.train', '--ref', ref, '--vae', os.path.join(world_dir, exact.VAE),
            '--depth', str(world.student_depth), '--patch-nums', '_'.join(map(str, world.patch_nums)),
            '--num-classes', str(world.num_classes), '--vae-vocab', str(world.vocab), '--vae-ch', '32', '--vae-z', '8',
            '--dataset', 'var_ext.exact:training_set', '--metric', 'var_ext.exact:teacher_nll', '--amp', 'fp32',
            '--eval-cfg', '0', '--select-cfg', '0', '--eval-samples', str(size['select']), '--eval-batch', '500',
            '--eval-every', str(ddo['eval_every']), '--iterations', str(ddo['iterations']),
            '--global-batch', str(ddo['global_batch']), '--lr', str(ddo['lr']), '--ddo-alpha', str(ddo['alpha']),
            '--ddo-beta', str(ddo['beta']), '--label-drop', str(ddo['label_drop']), '--workers', '0', '--seed', str(seed), '--outdir', run_dir]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'), **{exact.ENV: world_dir})
    with open(os.path.join(out, 'rounds.log'), 'a') as f:
        proc = subprocess.run([sys.executable] + argv, cwd=out, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        sys.exit(f'var_ext.train failed; see {os.path.join(out, "rounds.log")}')
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        metrics = [json.loads(line) for line in f]
    return os.path.join(run_dir, 'var-ddo-best.pth'), metrics


def mean_se(values: torch.Tensor) -> dict:
    return dict(mean=float(values.mean()), se=float(values.std() / len(values) ** 0.5))


def evaluate(world_dir, var, cfg, seeds, heldout) -> dict:
    """Per-sample means and standard errors of precision, recall and coverage of `var`'s sampler q at scale cfg, and
    the two exact divergences between q and p_data, which weigh precision against entropy (KL(q || p) = -entropy -
    precision: guidance can raise precision and still move q away from p_data) and recall against p_data's entropy."""
    _, _, teacher = exact.load_world(world_dir)
    labels = torch.as_tensor(seeds) % var.num_classes
    samples = exact.draw(var, labels, seeds, cfg)
    teacher_on_samples, model_on_samples = exact.log_likelihoods(teacher, labels, samples), exact.log_likelihoods(var, labels, samples, cfg)
    heldout_labels, heldout_tokens, teacher_on_heldout = heldout
    model_on_heldout = exact.log_likelihoods(var, heldout_labels, heldout_tokens, cfg)
    return dict(precision=mean_se(teacher_on_samples), recall=mean_se(-model_on_heldout), entropy=mean_se(-model_on_samples),
                kl_model_data=mean_se(model_on_samples - teacher_on_samples),
                kl_data_model=mean_se(teacher_on_heldout - model_on_heldout))


def heldout_set(world_dir):
    """The held-out teacher pyramids: (labels, tokens, their teacher log-likelihoods), computed once and passed to
    the workers."""
    _, _, teacher = exact.load_world(world_dir)
    labels, tokens = exact.load_set(world_dir, exact.HELDOUT)
    return labels, tokens, exact.log_likelihoods(teacher, labels, tokens)


def report_row(world_dir, path, depth, cfg, seeds, heldout) -> dict:
    """`evaluate` of a checkpoint, in a worker process."""
    return evaluate(world_dir, exact.load_model(world_dir, path, depth), cfg, seeds, heldout)


def curve_point(world_dir, path, depth, heldout) -> dict:
    """Held-out and training NLL of an MLE checkpoint (as many training pyramids as held-out ones)."""
    var = exact.load_model(world_dir, path, depth)
    labels, tokens, _ = heldout
    train_labels, train_tokens = exact.load_set(world_dir, exact.TRAIN)
    return dict(heldout=mean_se(-exact.log_likelihoods(var, labels, tokens)),
                train=mean_se(-exact.log_likelihoods(var, train_labels[:len(labels)], train_tokens[:len(labels)])))


def teacher_row(heldout) -> dict:
    """p_data's own row: its exact samples are the held-out set (its sampler's divergences from itself are 0)."""
    log_p = heldout[2]
    return dict(precision=mean_se(log_p), recall=mean_se(-log_p), entropy=mean_se(-log_p),
                kl_model_data=mean_se(log_p * 0), kl_data_model=mean_se(log_p * 0))


def one_thread():
    torch.set_num_threads(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--outdir', required=True, help='Work directory; rerun the same command to resume.')
    parser.add_argument('--size', choices=sorted(SIZES), default='full', help='full: the documented run; quick: the test suite\'s.')
    parser.add_argument('--jobs', type=int, default=2, help='worker processes (one thread each) for the control run, '
                        'alongside the rounds, and for the evaluations (default: %(default)s, one per core of the 2-core target)')
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    out, size = os.path.abspath(args.outdir), SIZES[args.size]
    world, world_dir = size['world'], os.path.join(os.path.abspath(args.outdir), 'world')
    os.makedirs(out, exist_ok=True)
    cache, t0 = Cache(os.path.join(out, 'scores.json')), time.time()
    pool = concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), multiprocessing.get_context('spawn'), initializer=one_thread)
    with pool:
        pool.submit(one_thread)   # the workers start (import torch and VAR) while the world is built
        result = run(args.size, size, out, world, world_dir, cache, pool)
    result['wall_seconds_this_invocation'] = time.time() - t0
    write_atomic(os.path.join(out, 'var_exact.json'), lambda f: f.write(json.dumps(result, indent=2).encode()))
    write_report(out, result)
    log(f'done in {time.time() - t0:.0f} s: {out}/var_exact.md, var_exact.json, var_exact.png')
    return result


def run(size_name, size, out, world, world_dir, cache, pool) -> dict:
    log(f'1/4 world: teacher depth {world.teacher_depth}, student depth {world.student_depth}, {world.train_size} training '
        f'and {world.heldout_size} held-out pyramids of {sum(p * p for p in world.patch_nums)} tokens')
    exact.make_world(world_dir, world)
    heldout = heldout_set(world_dir)
    teacher_entropy = mean_se(-heldout[2])
    log(f'    teacher entropy {teacher_entropy["mean"]:.2f} +- {teacher_entropy["se"]:.2f} nats')

    log(f'2/4 MLE student, {size["mle_steps"]} steps of batch {size["batch"]} (curve every {size["curve_every"]})')
    student = mle(world_dir, os.path.join(out, 'mle'), world, size, size['mle_steps'], size['curve_every'])
    steps = range(size['curve_every'], size['mle_steps'] + 1, size['curve_every'])
    points = cache.fill(pool, {f'mle curve {step}': (curve_point, world_dir, checkpoint(os.path.join(out, 'mle'), step),
                                                     world.student_depth, heldout) for step in steps})
    curve = [dict(step=step, **points[f'mle curve {step}']) for step in steps]
    for point in curve:
        log(f'    step {point["step"]}: held-out NLL {point["heldout"]["mean"]:.3f} +- {point["heldout"]["se"]:.3f}, '
            f'training NLL {point["train"]["mean"]:.3f}')

    # The control's length is known before the rounds run: it trains alongside them in a worker.
    trained = size['rounds'] * size['ddo']['iterations'] * size['ddo']['global_batch']
    extra = -(-trained // size['batch'])
    continued_dir = os.path.join(out, 'continued')
    if not os.path.isdir(continued_dir):
        shutil.copytree(os.path.join(out, 'mle'), continued_dir + '.partial')
        os.rename(continued_dir + '.partial', continued_dir)
    continued = pool.submit(mle, world_dir, continued_dir, world, size, size['mle_steps'] + extra, extra)
    log(f'3/4 {size["rounds"]} DDO rounds (OUT/rounds.log); alongside, the control: MLE continued for {extra} steps '
        f'({extra * size["batch"]} samples; the rounds train on {trained} real ones)')
    reference, rounds = student, []
    for r in range(1, size['rounds'] + 1):
        best_path, metrics = ddo_round(out, world_dir, world, size, reference, os.path.join(out, f'round{r}'), seed=r)
        best = min(metrics, key=lambda m: (m['score'], m['iteration']))
        kept = best['iteration'] == 0   # nothing beat the start: the next round (and the report) uses the reference itself
        reference = reference if kept else best_path
        rounds.append(dict(round=r, path=reference, kept_reference=kept, best_iteration=best['iteration'], metrics=metrics))
        log(f'    round {r}: best iteration {best["iteration"]}, selection teacher NLL {best["score"]:.3f} '
            f'(start {metrics[0]["score"]:.3f})')
    continued = continued.result()

    paths = {'MLE student': student, 'continued MLE': continued}
    paths.update({f'DDO round {r["round"]}' + (' (kept its reference)' if r['kept_reference'] else ''): r['path'] for r in rounds})
    report = list(range(REPORT_SEEDS, REPORT_SEEDS + size['report']))
    log(f'4/4 report: {len(report)} samples per model and scale, scales {size["cfgs"]}')
    key = lambda path, cfg: f'{os.path.relpath(path, out)} cfg {cfg:g} report {len(report)}'   # noqa: E731
    noise_seeds = list(range(NOISE_SEEDS, NOISE_SEEDS + len(report)))
    jobs = {key(path, cfg): (report_row, world_dir, path, world.student_depth, cfg, report, heldout)
            for path in dict.fromkeys(paths.values()) for cfg in size['cfgs']}
    jobs[f'noise report {len(report)}'] = (report_row, world_dir, student, world.student_depth, 0, noise_seeds, heldout)
    scores = cache.fill(pool, jobs)
    rows = [dict(model=name, cfg=cfg, **scores[key(path, cfg)]) for name, path in paths.items() for cfg in size['cfgs']]
    rows.append(dict(model='teacher (p_data)', cfg=0, **teacher_row(heldout)))
    for r in rows:
        log(f'    {r["model"]} cfg {r["cfg"]:g}: precision {r["precision"]["mean"]:.3f} +- {r["precision"]["se"]:.3f}, recall NLL '
            f'{r["recall"]["mean"]:.3f} +- {r["recall"]["se"]:.3f}, entropy {r["entropy"]["mean"]:.3f}, KL(q||p) '
            f'{r["kl_model_data"]["mean"]:.3f}, KL(p||q) {r["kl_data_model"]["mean"]:.3f}')
    noise = scores[f'noise report {len(report)}']
    return dict(world=dataclasses.asdict(world), size=size_name, sizes={k: v for k, v in size.items() if k != 'world'},
                teacher_entropy=teacher_entropy, mle_curve=curve, rounds=rounds, continued_steps=extra, rows=rows,
                noise=dict(mle_cfg0_second_seed_set=noise), report_samples=len(report), targets=targets(rows, noise))


def row(rows, model, cfg):
    return next(r for r in rows if r['model'] == model and r['cfg'] == cfg)


def targets(rows, noise) -> dict:
    """Issue 10's targets: the last DDO round at cfg 0 against the MLE student at its most precise guided scale."""
    ddo = max(r['model'] for r in rows if r['model'].startswith('DDO'))
    scales = sorted({r['cfg'] for r in rows if r['model'] == 'MLE student'})
    best_guided = max((row(rows, 'MLE student', c) for c in scales), key=lambda r: r['precision']['mean'])
    ddo0, mle0 = row(rows, ddo, 0), row(rows, 'MLE student', 0)
    cont0 = row(rows, 'continued MLE', 0)
    return dict(
        model=ddo, mle_best_scale=best_guided['cfg'],
        precision_ddo_cfg0_minus_mle_best=ddo0['precision']['mean'] - best_guided['precision']['mean'],
        recall_ddo_cfg0_over_mle_cfg0=ddo0['recall']['mean'] / mle0['recall']['mean'],
        precision_gain_ddo_cfg0=ddo0['precision']['mean'] - mle0['precision']['mean'],
        precision_gain_continued_cfg0=cont0['precision']['mean'] - mle0['precision']['mean'],
        precision_noise_cfg0=abs(noise['precision']['mean'] - mle0['precision']['mean']),
        ddo_precision_at_or_above_mle_every_scale=all(
            row(rows, ddo, c)['precision']['mean'] >= row(rows, 'MLE student', c)['precision']['mean'] for c in scales),
        ddo_cfg0_kls_below_mle_every_scale=all(
            ddo0[kl]['mean'] < row(rows, 'MLE student', c)[kl]['mean'] for c in scales for kl in ('kl_model_data', 'kl_data_model')))


def write_report(out, result):
    lines = ['| model | cfg | precision: teacher log-lik of samples | recall: NLL of held-out teacher samples | '
             'entropy of the sampler | KL(q \\|\\| p_data) | KL(p_data \\|\\| q) | sampling cost |', '|---|---|---|---|---|---|---|---|']
    for r in result['rows']:
        lines.append(f'| {r["model"]} | {r["cfg"]:g} | ' + ' | '.join(
            f'{r[key]["mean"]:.2f} +- {r[key]["se"]:.2f}' for key in ('precision', 'recall', 'entropy', 'kl_model_data', 'kl_data_model'))
            + f' | {"2x" if r["cfg"] else "1x"} |')
    noise, t = result['noise']['mle_cfg0_second_seed_set'], result['targets']
    curve = result['mle_curve']
    lines += ['', f'{result["report_samples"]} samples per row (nats per 30-token pyramid, mean +- standard error). '
              f'Noise: the MLE student at cfg 0 on a second seed set: precision {noise["precision"]["mean"]:.2f} +- '
              f'{noise["precision"]["se"]:.2f}, entropy {noise["entropy"]["mean"]:.2f}.',
              'MLE held-out NLL curve: ' + ', '.join(f'{p["step"]} {p["heldout"]["mean"]:.3f}' for p in curve) +
              f' (training NLL at the end {curve[-1]["train"]["mean"]:.3f}).',
              f'Targets ({t["model"]} at cfg 0 vs the MLE student at its most precise scale, cfg {t["mle_best_scale"]:g}): '
              f'precision difference {t["precision_ddo_cfg0_minus_mle_best"]:+.2f}; recall NLL ratio to MLE at cfg 0 '
              f'{t["recall_ddo_cfg0_over_mle_cfg0"]:.3f}; precision at or above MLE at every scale: '
              f'{t["ddo_precision_at_or_above_mle_every_scale"]}; cfg-0 precision gain DDO {t["precision_gain_ddo_cfg0"]:+.2f}, '
              f'continued MLE {t["precision_gain_continued_cfg0"]:+.2f}; both KLs at cfg 0 below MLE\'s at every scale: '
              f'{t["ddo_cfg0_kls_below_mle_every_scale"]}.']
    with open(os.path.join(out, 'var_exact.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    plot(os.path.join(out, 'var_exact.png'), result)


def plot(path, result):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = result['rows']
    models_ = [m for m in dict.fromkeys(r['model'] for r in rows) if not m.startswith('teacher') and 'kept' not in m]   # a kept round repeats its reference
    teacher = next(r for r in rows if r['model'].startswith('teacher'))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4), dpi=90)
    for i, name in enumerate(models_):
        mine = [r for r in rows if r['model'] == name]
        cfgs = [r['cfg'] for r in mine]
        for ax, key in zip(axes[:2], ('precision', 'recall')):
            ax.errorbar(cfgs, [r[key]['mean'] for r in mine], [r[key]['se'] for r in mine], marker='o', ms=3, color=f'C{i}', label=name)
        axes[2].plot([r['recall']['mean'] for r in mine], [r['precision']['mean'] for r in mine], 'o-', ms=3, color=f'C{i}', label=name)
        axes[2].annotate('cfg 0', (mine[0]['recall']['mean'], mine[0]['precision']['mean']), fontsize=6)
        axes[3].plot([r['kl_data_model']['mean'] for r in mine], [r['kl_model_data']['mean'] for r in mine], 'o-', ms=3, color=f'C{i}', label=name)
        axes[3].annotate('cfg 0', (mine[0]['kl_data_model']['mean'], mine[0]['kl_model_data']['mean']), fontsize=6)
    axes[0].axhline(teacher['precision']['mean'], color='k', ls=':', lw=1, label='teacher')
    axes[1].axhline(teacher['recall']['mean'], color='k', ls=':', lw=1, label='teacher (its entropy)')
    axes[0].set(xlabel='cfg', ylabel='teacher log-lik of samples (higher: precision)')
    axes[1].set(xlabel='cfg', ylabel='NLL of held-out teacher samples (lower: recall)')
    axes[2].set(xlabel='NLL of held-out teacher samples (recall, lower is better)', ylabel='teacher log-lik of samples (precision)')
    axes[2].invert_xaxis()
    for ax in axes:
        ax.legend(fontsize=6)
    axes[2].set_title('precision against recall over cfg (up and right is better)', fontsize=8)
    axes[3].set(xlabel='KL(p_data || q), nats', ylabel='KL(q || p_data), nats', xscale='log', yscale='log')
    axes[3].set_title('the two exact divergences over cfg (down and left is better)', fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == '__main__':
    main()
