"""What does a healthy DDO run look like? The measurements behind docs/diagnostics.md and the rules of
`ddo_patch.diagnostics`: one round of both benchmarks' models at a good beta, a too-small one, a too-large one,
and a diverging learning rate, through the round manager as a user runs it.

    python benchmarks/digits.py --outdir runs/digits            # stages 1-2 are enough: data and pretrained model
    python benchmarks/var_exact.py --outdir runs/var-exact      # stages 1-2: the world and the MLE student
    python benchmarks/diagnostics.py --digits runs/digits --var-exact runs/var-exact --outdir runs/diagnostics

Per benchmark, OUT/<name>/ is a round manager work directory: `ddo-patch rounds report OUT/<name>` draws its
diagnostics (report-diagnostics-round01.png) and flags the points that leave the healthy range. The sweep points
differ in beta only; the diverging run is the good beta at a learning rate 30x the benchmark's (its own work
directory, `<name>-lr`). OUT/diagnostics.json and .md give, per run, the terms' summaries the rules read and the
evaluations. About 15 minutes on 2 cores (the two benchmarks' managers run side by side).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys

import digits as digits_bench
import var_exact as var_bench

from ddo_patch import diagnostics
from ddo_patch.files import write_atomic
from ddo_patch.rounds import report as rounds_report
from ddo_patch.rounds.backend import load_backend_class
from var_ext import exact, models

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'docs')
DIGITS = dict(alpha=2, betas=[0.003, 0.1, 3.0, 30.0], lr=1e-4, diverging_lr=3e-3)
VAR = dict(alpha=1, betas=[0.01, 1.0, 100.0], lr=1.5e-4, diverging_lr=4.5e-3)


def digits_config(path, digits_dir, betas, lr):
    """configs/digits-edm2.toml, one round of 4Ki images per point, status every 256 images, no control."""
    values = {'rounds': '1', 'pretraining_images': '"416Ki"', 'run.eval_every': '"1Ki"', 'sweep.alpha': f'[{DIGITS["alpha"]}]',
              'sweep.beta': json.dumps(betas), 'train.lr': str(lr), 'train.status': '256', 'train.checkpoint': '"1Ki"',
              'control.objective': None, 'control.start': None, 'evaluate.seeds': '"0-499"'}
    with open(digits_bench.CONFIG) as f:
        text = digits_bench.edit_config(f.read(), values)   # an empty [control]: no control
    write_atomic(path, lambda f: f.write(text.encode()))
    return dict(os.environ, OMP_NUM_THREADS='1', DDO_DIGITS=os.path.join(digits_dir, 'data'),
                DDO_DIGITS_PRETRAINED=digits_bench.snapshot(os.path.join(digits_dir, 'pretrain'), 416))


def var_config(path, var_dir, betas, lr):
    """var_exact.py's 'today' round (80 iterations of 512, evaluated every 8 on 2000 selection seeds), one round."""
    world_dir = os.path.join(var_dir, 'world')
    world = exact.load_world(world_dir)[0]
    tables = dict(run=dict(duration=80, eval_every=8), sweep=dict(alpha=[VAR['alpha']], beta=betas),
                  train=dict(var_bench.model_options(world), vae=os.path.join(world_dir, exact.VAE), dataset='var_ext.exact:training_set',
                             workers=0, global_batch=512, lr=lr, label_drop=0.5, amp='fp32', seed=1),
                  evaluate=dict(metric='var_ext.exact:teacher_nll', samples=2000, cfg=[0], select_cfg=0, batch=500))
    lines = ['backend = "var_ext.rounds_backend.RoundsBackend"', 'rounds = 1',
             f'pretrained = {json.dumps(os.path.join(var_dir, "mle", "student-004000.pth"))}']
    for name, values in tables.items():
        lines += [f'[{name}]'] + [f'{k} = {json.dumps(v)}' for k, v in values.items()]
    lines += ['[launcher]', 'kind = "local"', f'env = {{ OMP_NUM_THREADS = "1", {exact.ENV} = {json.dumps(world_dir)} }}']
    write_atomic(path, lambda f: f.write(('\n'.join(lines) + '\n').encode()))
    return dict(os.environ, OMP_NUM_THREADS='1')


def run_manager(out, name, config, env):
    workdir = os.path.join(out, name)
    with open(os.path.join(out, f'{name}.log'), 'a') as f:
        proc = subprocess.run([sys.executable, '-m', 'ddo_patch.cli', 'rounds', 'run', config, '--workdir', workdir],
                              cwd=out, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        sys.exit(f'the round manager failed; see {os.path.join(out, name + ".log")}')
    return workdir


def benchmark_runs(out, name, make_config, source, setting):
    """Both work directories of one benchmark (the beta sweep, the diverging learning rate); their paths."""
    workdirs = []
    for suffix, betas, lr in (('', setting['betas'], setting['lr']), ('-lr', [setting['betas'][1]], setting['diverging_lr'])):
        config = os.path.join(out, f'{name}{suffix}.toml')
        env = make_config(config, source, betas, lr)
        workdirs.append(run_manager(out, f'{name}{suffix}', config, env))
    return workdirs


def summarise(workdir) -> list:
    """Per run of the work directory's first round: its settings, the rules' summary and flags, its evaluations."""
    m = rounds_report.load(workdir)
    backend = load_backend_class(m['config']['backend'])
    rows = []
    for run in m['rounds'][0]['runs']:
        run_dir = os.path.join(workdir, run['run_dir'])
        log, settings = backend.training_log(run_dir), backend.run_settings(run_dir)
        evaluations = [dict(step=0, score=m['rounds'][0]['reference_score'])] + backend.run_evaluations(run_dir)
        rows.append(dict(run=os.path.basename(workdir) + '/' + run['name'], lr=run['options']['lr'], **settings,
                         summary=diagnostics.summary(log, settings['beta']),
                         flags=[flag._asdict() for flag in diagnostics.check(log, settings['beta'], evaluations)],
                         evaluations=evaluations, status=run['status'], error=run['error']))
    return rows


def markdown(rows) -> str:
    lines = ['| run | lr | beta | beta*(delta_real - delta_fake), 2nd half | saturated, 2nd half | accuracy real / fake, 2nd half | '
             'score: start -> best (last) | flags |', '|---|---|---|---|---|---|---|---|']
    for row in rows:
        s, scores = row['summary'], [e['score'] for e in row['evaluations']]
        finite = [x for x in scores if x == x]
        lines.append(f'| {row["run"]} | {row["lr"]:g} | {row["beta"]:g} | {s["separation"]:.3g} | {s["saturated"]:.2f} | '
                     f'{s["accuracy_real"]:.2f} / {s["accuracy_fake"]:.2f} | {scores[0]:.4g} -> {min(finite):.4g} ({scores[-1]:.4g}) | '
                     + ('; '.join(f['rule'] for f in row['flags']) or '-') + ' |')
    return '\n'.join(lines) + '\n'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--digits', required=True, help='benchmarks/digits.py\'s work directory (its data and pretrained model)')
    parser.add_argument('--var-exact', required=True, help='benchmarks/var_exact.py\'s work directory (its world and student)')
    parser.add_argument('--outdir', required=True, help='Work directory; rerun the same command to resume.')
    parser.add_argument('--docs', action='store_true', help='also copy the two rounds\' diagnostics plots into docs/')
    args = parser.parse_args()
    models.activate_upstream()
    out = os.path.abspath(args.outdir)
    os.makedirs(out, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = {'digits': pool.submit(benchmark_runs, out, 'digits', digits_config, os.path.abspath(args.digits), DIGITS),
                'var': pool.submit(benchmark_runs, out, 'var', var_config, os.path.abspath(args.var_exact), VAR)}
        workdirs = {name: job.result() for name, job in jobs.items()}
    rows = [row for dirs in workdirs.values() for workdir in dirs for row in summarise(workdir)]
    write_atomic(os.path.join(out, 'diagnostics.json'), lambda f: f.write(json.dumps(rows, indent=1).encode()))
    text = markdown(rows)
    write_atomic(os.path.join(out, 'diagnostics.md'), lambda f: f.write(text.encode()))
    print(text)
    for name, (sweep, _) in workdirs.items():
        rounds_report.report(sweep)
        if args.docs:
            shutil.copy(os.path.join(sweep, 'report-diagnostics-round01.png'), os.path.join(DOCS, f'diagnostics-{name}.png'))


if __name__ == '__main__':
    main()
