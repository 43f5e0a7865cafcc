"""Does DDO improve a VAR beyond the finetune around it? The VAR route in a world with exact likelihoods
(`var_ext.exact`), on a CPU.

    ddo-patch fetch var
    python benchmarks/var_exact.py --outdir runs/var-exact      # rerun the same command to resume after any stop

Stages, each cached in --outdir (a rerun skips what is done):
  1. world      a depth-3 teacher VAR with sharpened, strongly class-dependent conditionals is p_data; its exact
                samples (no top-k/top-p, no guidance) are the training set (100k pyramids: the student is limited by
                its capacity, not by data) and a held-out set, split into a tuning half (benchmarks/var_exact_tune.py)
                and a report half (touched once, here)
  2. MLE        a depth-1 student (its adaLN gates open, as the teacher's) trained the way VAR trains: AdamW with
                upstream's warm-up and `lin0` decay to 1% of the peak (`utils.lr_control`), VAR's 10% label dropout;
                a checkpoint and a tuning-half NLL every --curve-every steps
  3. rounds     per regime (hyperparameters) and training seed (1, 2, 3: data order, reference samples, dropout masks)
                `ddo-patch rounds run` with the VAR backend: DDO rounds through `python -m var_ext.train`, each round's best checkpoint (teacher NLL
                of guidance-free samples on the selection seeds) the next round's reference, and [control], the matched
                control: the same runs with `--objective mle` (VAR's 10% label dropout), a chain from its own previous
                choice, selected the same way; alongside, in a worker, continued MLE (the student's run at its final
                learning rate) for as many real samples as the rounds train on
  4. report     each model on the report seeds and the report half: precision (teacher log-likelihood of its
                samples), recall (NLL of held-out teacher samples under its sampler), entropy, and the two exact KL
                divergences between sampler and p_data, per sample (OUT/samples); DDO - control paired per sample
                (same sampling seeds, same held-out pyramids) and over the training seeds; the metric's own noise (the
                student on a second seed set); var_exact.md, var_exact.json, var_exact.png

Hyperparameters are chosen by benchmarks/var_exact_tune.py on the tuning seeds and half (training seed 0), disjoint from
the selection, report and noise seeds and from the report half.
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
import var_exact_report

from ddo_patch.files import write_atomic
from ddo_patch.metrics import across_seeds
from var_ext import exact, models
from var_ext.trainer import parameter_groups

WORLD = exact.World(train_size=100_000, heldout_size=8000)
ROUND = dict(iterations=80, global_batch=512, label_drop=0.5, eval_every=8)
# The two regimes var_exact_tune.py chose on the tuning seeds and half: today's (the DDO candidate of largest precision
# gain), the paper's (large alpha, small beta, lr 1/600 of the pretraining peak: its candidate of smallest KL(q || p)).
# Each has its own matched control, at its own learning rate.
REGIMES = {'today': dict(ROUND, alpha=1, beta=1, lr=1.5e-4), 'paper': dict(ROUND, alpha=50, beta=0.02, lr=5e-6)}
# Sizes: `full` is the documented run; `quick` is the suite's reduced run (tests/test_var_exact.py).
SIZES = {
    'full': dict(world=WORLD, mle_steps=4000, curve_every=500, batch=256, lr=3e-3, report=2000, select=2000,
                 cfgs=[0, 0.5, 1, 1.5], rounds=2, seeds=[1, 2, 3], regimes=REGIMES, control=dict(label_drop=0.1)),
    'quick': dict(world=dataclasses.replace(WORLD, num_classes=10, train_size=2000, heldout_size=2000), mle_steps=100,
                  curve_every=50, batch=128, lr=3e-3, report=2000, select=200, cfgs=[0], rounds=1, seeds=[1],
                  regimes={'a3': dict(iterations=16, global_batch=256, lr=5e-4, alpha=3, beta=1, label_drop=0.5, eval_every=4)},
                  control=dict(label_drop=0.1)),
    # Is it the world or the implementation? A student of the teacher's own architecture, at the teacher's weights
    # perturbed: capacity is no limit, p_data is DDO's optimum (Theorem 3.1), and both KLs must fall towards 0. DDO drops
    # labels at the control's 10%: p_data is conditional only, and VAR's one unconditional embedding cannot represent
    # its 100-class mixture, so at 50% the unconditional half pulls the shared weights away from p_data.
    'perturbed': dict(world=dataclasses.replace(WORLD, student_depth=WORLD.teacher_depth), perturbation=0.05, batch=256,
                      report=2000, select=2000, cfgs=[0], rounds=3, seeds=[1], control=dict(label_drop=0.1),
                      regimes={'a1': dict(iterations=32, global_batch=256, lr=5e-5, alpha=1, beta=1, label_drop=0.1, eval_every=8)}),
    # The suite's: 10 classes, a perturbation twice as large (more for one 12-iteration round to undo), DDO's 50%.
    'quick-perturbed': dict(world=dataclasses.replace(WORLD, student_depth=WORLD.teacher_depth, num_classes=10, train_size=2000,
                                                      heldout_size=2000), perturbation=0.1, batch=128, report=1000, select=200,
                            cfgs=[0], rounds=1, seeds=[1], control=None,
                            regimes={'a1': dict(iterations=12, global_batch=256, lr=5e-5, alpha=1, beta=1, label_drop=0.5, eval_every=4)}),
}
SCHEDULE = dict(schedule='lin0', warmup=1 / 50, wp0=0.005, wpe=0.01, wd=0.05)   # upstream VAR's defaults (train.py, arg_util)
REPORT_SEEDS, NOISE_SEEDS, TUNING_SEEDS = 10_000_000, 20_000_000, 30_000_000   # first of each model-sampling seed set
MEASURES = var_exact_report.MEASURES


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
    """The student's MLE run to step `last`, a checkpoint every `every` steps; resumes from its latest state. The
    learning rate follows VAR's schedule over size['mle_steps'] steps and stays at its final value after them (the
    continued-MLE control)."""
    state_path = os.path.join(run_dir, 'training-state.pth')
    if os.path.isfile(checkpoint(run_dir, last)):
        return checkpoint(run_dir, last)
    os.makedirs(run_dir, exist_ok=True)
    torch.manual_seed(world.seed + 1)
    vae, var = models.build(world.config(world.student_depth), 'cpu')
    vae.load_state_dict(torch.load(os.path.join(world_dir, exact.VAE)), strict=True)
    exact.switch_on_blocks(var)
    optimizer = torch.optim.AdamW(parameter_groups(var)[2], lr=size['lr'], betas=(0.9, 0.95), weight_decay=SCHEDULE['wd'])
    first = 0
    if os.path.isfile(state_path):
        state = torch.load(state_path, weights_only=False)
        var.load_state_dict(state['var'])
        optimizer.load_state_dict(state['optimizer'])
        first = state['step']
    from utils import lr_control
    steps = size['mle_steps']

    def set_lr(step):
        lr_control.lr_wd_annealing(SCHEDULE['schedule'], optimizer, size['lr'], SCHEDULE['wd'], SCHEDULE['wd'],
                                   min(step, steps - 1), SCHEDULE['warmup'] * steps, steps, wp0=SCHEDULE['wp0'], wpe=SCHEDULE['wpe'])

    def save(step):
        torch.save(var.state_dict(), checkpoint(run_dir, step))
        torch.save({'var': var.state_dict(), 'optimizer': optimizer.state_dict(), 'step': step}, state_path)

    labels, tokens = exact.load_set(world_dir, exact.TRAIN)
    exact.train_mle(var, optimizer, labels, tokens, first, last, size['batch'], world.seed, every, save, set_lr)
    return checkpoint(run_dir, last)


def perturbed_teacher(world_dir, run_dir, scale) -> str:
    """The teacher's weights with Gaussian noise of `scale` times each parameter tensor's own standard deviation added
    (buffers kept): a student of the teacher's architecture, which can represent p_data exactly."""
    path = os.path.join(run_dir, 'perturbed-teacher.pth')
    if not os.path.isfile(path):
        _, _, teacher = exact.load_world(world_dir)
        generator, state = torch.Generator().manual_seed(0), teacher.state_dict()
        with torch.no_grad():
            for name, param in teacher.named_parameters():
                spread = param.std() if param.numel() > 1 else param.abs()
                state[name] = param + scale * spread * torch.randn(param.shape, generator=generator)
        os.makedirs(run_dir, exist_ok=True)
        write_atomic(path, lambda f: torch.save(state, f))
    return path


def heldout_half(world_dir, half):
    """The 'tune' or 'report' half of the held-out teacher pyramids: (labels, tokens, their teacher log-likelihoods)."""
    _, _, teacher = exact.load_world(world_dir)
    labels, tokens = exact.load_set(world_dir, exact.HELDOUT)
    middle = len(labels) // 2
    part = slice(0, middle) if half == 'tune' else slice(middle, None)
    return labels[part], tokens[part], exact.log_likelihoods(teacher, labels[part], tokens[part])


def model_options(world) -> dict:
    """The flags that give var_ext.train and var_ext.evaluate the student's shapes."""
    return dict(depth=world.student_depth, patch_nums='_'.join(map(str, world.patch_nums)), num_classes=world.num_classes,
                vae_vocab=world.vocab, vae_ch=32, vae_z=8)


def toml_value(value):
    return json.dumps(value)   # numbers, strings and lists of them are spelled alike in TOML and JSON


def rounds_config(path, world_dir, world, size, ddo, student, seed) -> str:
    """The round manager's config of one regime and training seed: DDO's one sweep point, the matched control, the
    exact metric."""
    tables = {}
    tables['run'] = dict(duration=ddo['iterations'], eval_every=ddo['eval_every'])
    tables['sweep'] = dict(alpha=[ddo['alpha']], beta=[ddo['beta']])
    tables['train'] = dict(model_options(world), vae=os.path.join(world_dir, exact.VAE), dataset='var_ext.exact:training_set',
                           workers=0, global_batch=ddo['global_batch'], lr=ddo['lr'], label_drop=ddo['label_drop'], amp='fp32',
                           seed=seed, **{k: ddo[k] for k in ('warmup',) if k in ddo})
    if size['control']:
        tables['control'] = dict(objective='mle', start='control', **size['control'])
    tables['evaluate'] = dict(metric='var_ext.exact:teacher_nll', samples=size['select'], cfg=[0], select_cfg=0, batch=500)
    lines = ['backend = "var_ext.rounds_backend.RoundsBackend"', f'rounds = {size["rounds"]}', f'pretrained = {toml_value(student)}']
    if 'mle_steps' in size:
        lines.append(f'pretraining_images = {size["mle_steps"] * size["batch"]}')
    for name, values in tables.items():
        lines += [f'[{name}]'] + [f'{k} = {toml_value(v)}' for k, v in values.items()]
    lines += ['[launcher]', 'kind = "local"', f'env = {{ OMP_NUM_THREADS = "1", {exact.ENV} = {toml_value(world_dir)} }}']
    write_atomic(path, lambda f: f.write(('\n'.join(lines) + '\n').encode()))
    return path


def run_rounds(out, world_dir, world, size, regime, student, seed) -> dict:
    """`ddo-patch rounds run` of one regime and training seed in OUT/rounds-<regime>-s<seed>; its manifest."""
    name = f'rounds-{regime}-s{seed}'
    config = rounds_config(os.path.join(out, f'{name}.toml'), world_dir, world, size, size['regimes'][regime], student, seed)
    with open(os.path.join(out, f'{name}.log'), 'a') as f:
        proc = subprocess.run([sys.executable, '-m', 'ddo_patch.cli', 'rounds', 'run', config, '--workdir', os.path.join(out, name)],
                              cwd=out, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        sys.exit(f'the round manager failed; see {os.path.join(out, name + ".log")}')
    with open(os.path.join(out, name, 'manifest.json')) as f:
        return json.load(f)


def label(arm, regime, round_idx, seed) -> str:
    return f'{arm} {regime} round {round_idx} (seed {seed})'


def chains(out, manifest, student, regime, seed) -> dict:
    """{'DDO REGIME round r (seed s)': checkpoint, 'control REGIME round r (seed s)': checkpoint}: each round's choice (a
    round that kept its start names the start)."""
    workdir, paths, ddo, control = os.path.join(out, f'rounds-{regime}-s{seed}'), {}, student, student
    for record in manifest['rounds']:
        ddo = ddo if record['chosen']['run'] == 'reference' else os.path.join(workdir, record['chosen']['snapshot'])
        paths[label('DDO', regime, record['round'], seed)] = ddo
        if record.get('control'):
            chosen = record['control']['chosen']
            control = control if chosen['run'] == 'start' else os.path.join(workdir, chosen['snapshot'])
            paths[label('control', regime, record['round'], seed)] = control
    return paths


def per_sample(world_dir, path, depth, cfg, seeds, heldout) -> dict:
    """Per-sample log-likelihoods of `path`'s sampler at scale cfg: teacher and model on its samples (one per seed,
    labels seed % classes), teacher and model on the held-out pyramids; float64 tensors."""
    var = exact.load_model(world_dir, path, depth)
    _, _, teacher = exact.load_world(world_dir)
    labels = torch.as_tensor(seeds) % var.num_classes
    samples = exact.draw(var, labels, seeds, cfg)
    heldout_labels, heldout_tokens, teacher_on_heldout = heldout
    return dict(teacher_on_samples=exact.log_likelihoods(teacher, labels, samples).double(),
                model_on_samples=exact.log_likelihoods(var, labels, samples, cfg).double(),
                teacher_on_heldout=teacher_on_heldout.double(),
                model_on_heldout=exact.log_likelihoods(var, heldout_labels, heldout_tokens, cfg).double())


def measures(values) -> dict:
    """The per-sample measures of `per_sample`'s values: precision (teacher log-lik of samples), recall (NLL of held-out
    pyramids), the sampler's entropy, KL(q || p_data) = -entropy - precision, KL(p_data || q) = recall - H(p_data)."""
    return dict(precision=values['teacher_on_samples'], recall=-values['model_on_heldout'], entropy=-values['model_on_samples'],
                kl_model_data=values['model_on_samples'] - values['teacher_on_samples'],
                kl_data_model=values['teacher_on_heldout'] - values['model_on_heldout'])


def mean_se(values: torch.Tensor) -> dict:
    return dict(mean=float(values.mean()), se=float(values.std() / len(values) ** 0.5))


def scored(out, key, world_dir, path, depth, cfg, seeds, heldout) -> dict:
    """The means and standard errors of `measures`, the per-sample values kept in OUT/samples/KEY.pt (for pairing)."""
    values = per_sample(world_dir, path, depth, cfg, seeds, heldout)
    os.makedirs(os.path.join(out, 'samples'), exist_ok=True)
    torch.save(values, os.path.join(out, 'samples', key.replace('/', '_').replace(' ', '_') + '.pt'))
    return {name: mean_se(v) for name, v in measures(values).items()}


def load_samples(out, key) -> dict:
    return torch.load(os.path.join(out, 'samples', key.replace('/', '_').replace(' ', '_') + '.pt'))


def paired(a: dict, b: dict) -> dict:
    """a - b per sample (the same sampling seeds; the same held-out pyramids): mean and standard error per measure."""
    ma, mb = measures(a), measures(b)
    return {name: mean_se(ma[name] - mb[name]) for name in MEASURES}


def curve_point(world_dir, path, depth, heldout) -> dict:
    """Tuning-half and training NLL of an MLE checkpoint (as many training pyramids as tuning ones)."""
    var = exact.load_model(world_dir, path, depth)
    labels, tokens, _ = heldout
    train_labels, train_tokens = exact.load_set(world_dir, exact.TRAIN)
    return dict(heldout=mean_se(-exact.log_likelihoods(var, labels, tokens)),
                train=mean_se(-exact.log_likelihoods(var, train_labels[:len(labels)], train_tokens[:len(labels)])))


def init_worker():
    """One thread per worker process (the pool has one per core), VAR's checkout activated as in main()."""
    torch.set_num_threads(1)
    models.activate_upstream()


def student_and_curve(out, world, world_dir, size, cache, pool) -> tuple:
    """Stages 1-2 (also var_exact_tune.py's): the world, the MLE student and its curve on the tuning half (or the
    perturbed teacher, without a curve)."""
    log(f'1/4 world: teacher depth {world.teacher_depth}, student depth {world.student_depth}, {world.train_size} training '
        f'and {world.heldout_size} held-out pyramids of {sum(p * p for p in world.patch_nums)} tokens')
    exact.make_world(world_dir, world)
    if 'perturbation' in size:
        log(f'2/4 the student: the teacher, each weight tensor perturbed by {size["perturbation"]:g} of its standard deviation')
        return perturbed_teacher(world_dir, os.path.join(out, 'student'), size['perturbation']), []
    tune = heldout_half(world_dir, 'tune')
    log(f'2/4 MLE student, {size["mle_steps"]} steps of batch {size["batch"]}, VAR\'s lin0 schedule from {size["lr"]:g} '
        f'(curve every {size["curve_every"]})')
    student = mle(world_dir, os.path.join(out, 'mle'), world, size, size['mle_steps'], size['curve_every'])
    steps = range(size['curve_every'], size['mle_steps'] + 1, size['curve_every'])
    points = cache.fill(pool, {f'mle curve {step}': (curve_point, world_dir, checkpoint(os.path.join(out, 'mle'), step),
                                                     world.student_depth, tune) for step in steps})
    curve = [dict(step=step, **points[f'mle curve {step}']) for step in steps]
    for point in curve:
        log(f'    step {point["step"]}: tuning-half NLL {point["heldout"]["mean"]:.3f} +- {point["heldout"]["se"]:.3f}, '
            f'training NLL {point["train"]["mean"]:.3f}')
    return student, curve


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--outdir', required=True, help='Work directory; rerun the same command to resume.')
    parser.add_argument('--size', choices=sorted(SIZES), default='full', help='full: the documented run; quick: the test suite\'s.')
    parser.add_argument('--jobs', type=int, default=2, help='worker processes (one thread each) for the training seeds\' rounds '
                        'and the evaluations (default: %(default)s, one per core of the 2-core target)')
    args = parser.parse_args(argv)
    models.activate_upstream()
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    out, size = os.path.abspath(args.outdir), SIZES[args.size]
    world, world_dir = size['world'], os.path.join(out, 'world')
    os.makedirs(out, exist_ok=True)
    cache, t0 = Cache(os.path.join(out, 'scores.json')), time.time()
    pool = concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), multiprocessing.get_context('spawn'), initializer=init_worker)
    with pool:
        pool.submit(init_worker)   # the workers start (import torch and VAR) while the world is built
        result = run(args.size, size, out, world, world_dir, cache, pool, args.jobs)
    result['wall_seconds_this_invocation'] = time.time() - t0
    write_atomic(os.path.join(out, 'var_exact.json'), lambda f: f.write(json.dumps(result, indent=2).encode()))
    var_exact_report.write_report(out, result)
    log(f'done in {time.time() - t0:.0f} s: {out}/var_exact.md, var_exact.json, var_exact.png')
    return result


def run(size_name, size, out, world, world_dir, cache, pool, jobs) -> dict:
    student, curve = student_and_curve(out, world, world_dir, size, cache, pool)
    report_half = heldout_half(world_dir, 'report')

    # The continued-MLE control's length is known before the rounds run: it trains alongside them in a worker.
    trained = size['rounds'] * max(ddo['iterations'] * ddo['global_batch'] for ddo in size['regimes'].values())
    extra = -(-trained // size['batch'])
    continued = None
    if 'mle_steps' in size:   # a perturbed teacher has no pretraining run to continue
        continued_dir = os.path.join(out, 'continued')
        if not os.path.isdir(continued_dir):
            shutil.copytree(os.path.join(out, 'mle'), continued_dir + '.partial')
            os.rename(continued_dir + '.partial', continued_dir)
        continued = pool.submit(mle, world_dir, continued_dir, world, size, size['mle_steps'] + extra, extra)
    for regime, ddo in size['regimes'].items():
        log(f'3/4 {regime}: {size["rounds"]} DDO rounds (alpha {ddo["alpha"]:g}, beta {ddo["beta"]:g}, lr {ddo["lr"]:g}, '
            f'{ddo["iterations"]} iterations of {ddo["global_batch"]})' + (' and the matched control' if size['control'] else '') +
            f', training seeds {size["seeds"]} (OUT/rounds-{regime}-s<seed>.log)')
    if continued:
        log(f'    alongside, continued MLE for {extra} steps')
    runs = [(regime, seed) for regime in size['regimes'] for seed in size['seeds']]
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as threads:
        manifests = dict(zip(runs, threads.map(lambda run: run_rounds(out, world_dir, world, size, run[0], student, run[1]), runs)))
    start = 'MLE student' if 'mle_steps' in size else 'perturbed teacher'
    paths = {start: student, **({'continued MLE': continued.result()} if continued else {})}
    for (regime, seed), manifest in manifests.items():
        paths.update(chains(out, manifest, student, regime, seed))
        for record in manifest['rounds']:
            control = record.get('control')
            log(f'    {regime} seed {seed} round {record["round"]}: DDO chose {record["chosen"]["run"]} ({record["chosen"]["score"]:.3f}, '
                f'start {record["reference_score"]:.3f})' + (f', control {control["chosen"]["run"]} ({control["chosen"]["score"]:.3f})'
                                                           if control else ''))

    report = list(range(REPORT_SEEDS, REPORT_SEEDS + size['report']))
    last, first_seed = size['rounds'], size['seeds'][0]
    guided = [start] + [label(arm, regime, last, first_seed) for regime in size['regimes']
                        for arm in ('DDO', 'control')[:2 if size['control'] else 1]]
    rows = [(name, cfg) for name in paths for cfg in (size['cfgs'] if name in guided else [0])]
    log(f'4/4 report: {len(report)} samples per model and scale, {len(rows)} rows, on the report half ({len(report_half[0])} pyramids)')
    key = lambda name, cfg: f'{os.path.relpath(paths[name], out)} cfg {cfg:g} report {len(report)}'   # noqa: E731
    jobs_ = {key(name, cfg): (scored, out, key(name, cfg), world_dir, paths[name], world.student_depth, cfg, report, report_half)
             for name, cfg in rows}
    noise_key = f'noise report {len(report)}'
    jobs_[noise_key] = (scored, out, noise_key, world_dir, student, world.student_depth, 0,
                        list(range(NOISE_SEEDS, NOISE_SEEDS + len(report))), report_half)
    scores = cache.fill(pool, jobs_)
    table = [dict(model=name, cfg=cfg, **scores[key(name, cfg)]) for name, cfg in rows]
    log_p = report_half[2].double()
    table.append(dict(model='teacher (p_data)', cfg=0, precision=mean_se(log_p), recall=mean_se(-log_p), entropy=mean_se(-log_p),
                      kl_model_data=mean_se(log_p * 0), kl_data_model=mean_se(log_p * 0)))
    for r in table:
        log(f'    {r["model"]} cfg {r["cfg"]:g}: ' + ', '.join(f'{m} {r[m]["mean"]:.3f} +- {r[m]["se"]:.3f}' for m in MEASURES))
    comparisons = compare(out, start, size, lambda name: key(name, 0), noise_key)
    return dict(world=dataclasses.asdict(world), size=size_name, sizes={k: v for k, v in size.items() if k != 'world'},
                schedule=SCHEDULE, mle_curve=curve, rounds={f'{regime} {seed}': m['rounds'] for (regime, seed), m in manifests.items()},
                continued_steps=extra, rows=table, comparisons=comparisons, report_samples=len(report),
                report_half=len(report_half[0]))


def compare(out, start, size, key, noise_key) -> dict:
    """Paired differences at cfg 0 per round: DDO - control, DDO - the start and control - the start (per seed, then over
    seeds), and the noise: the start on the noise seeds - on the report seeds (other samples, the same held-out)."""
    student = load_samples(out, key(start))
    result = {f'noise ({start}, second seed set - report seeds)': paired(load_samples(out, noise_key), student)}
    arms = [('DDO', 'control')] if size['control'] else []
    arms += [('DDO', None)] + ([('control', None)] if size['control'] else [])
    for regime in size['regimes']:
        for round_idx in range(1, size['rounds'] + 1):
            for a, b in arms:
                diffs = [paired(load_samples(out, key(label(a, regime, round_idx, s))),
                                load_samples(out, key(label(b, regime, round_idx, s))) if b else student) for s in size['seeds']]
                result[f'{regime} round {round_idx}: {a} - {b or start}'] = {
                    m: across_seeds([d[m]['mean'] for d in diffs], [d[m]['se'] for d in diffs]) for m in MEASURES}
    return result


if __name__ == '__main__':
    main()
