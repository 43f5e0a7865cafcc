"""What the round manager needs to know about each codebase: which entry points to run with which
options, and where their results are. Kept thin on purpose: everything else is shared.

edm2: reference samples with `edm2_ext.generate` once per round, then per sweep point
      `edm2_ext.train` (snapshots every run.eval_every images) and `edm2_ext.evaluate` (every snapshot,
      `eval.json`); the chosen snapshot is a `network-snapshot-*.pkl`.
var:  per sweep point `var_ext.train`, which samples its reference online, evaluates every
      run.eval_every iterations itself (`metrics.jsonl`) and keeps `var-ddo-best.pth`.
"""

from __future__ import annotations

import json
import math
import os
import re

from ddo_patch.errors import DDOPatchError
from ddo_patch.rounds_launch import Command

FLAGS_AS_NAMED = ('P_mean', 'P_std')   # EDM2's own spelling; every other option is --name-with-dashes


def flag(name: str) -> str:
    return '--' + (name if name in FLAGS_AS_NAMED else name.replace('_', '-'))


def option_args(options: dict) -> list:
    args = []
    for name, value in options.items():
        args += [flag(name), str(value)]
    return args


def _json_lines(path) -> list:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _scalar(value):
    return value['mean'] if isinstance(value, dict) else value   # training_stats rows may hold {num, mean, std}


def point_name(alpha, beta) -> str:
    return f'a{alpha:g}_b{beta:g}'


class EDM2:
    name = 'edm2'
    step_unit = 'kimg'
    snapshot_pattern = re.compile(r'network-snapshot-(\d+)(-[\d.]+)?\.pkl')

    def __init__(self, cfg):
        self.cfg = cfg

    def validate(self):
        cfg = self.cfg
        if cfg.eval_every % 1024:
            raise DDOPatchError(f'{cfg.source}: run.eval_every must be a multiple of 1024 images (EDM2 snapshots), got {cfg.eval_every}')
        if cfg.duration % cfg.eval_every:
            raise DDOPatchError(f'{cfg.source}: run.duration {cfg.duration} must be a multiple of run.eval_every '
                                f'{cfg.eval_every}, so that the last step is evaluated')
        if any(str(options.get('checkpoint', 1)) in ('0', '0Ki', '0Mi') for options in
               [cfg.train] + [values for _, values in cfg.overrides]):
            raise DDOPatchError(f'{cfg.source}: train.checkpoint must not be 0: the manager resumes runs from their checkpoints')

    def metric_label(self):
        return self.cfg.evaluate['metric']

    def _root(self):
        return ['--edm2-root', self.cfg.upstream_root] if self.cfg.upstream_root else []

    def reference_samples(self, round_dir, reference) -> tuple:
        """(the round's reference samples, the command that makes them) or (None, None)."""
        fake = f'{round_dir}/reference-samples.zip'
        options = {'seeds': '0-49999', **self.cfg.reference_samples}
        return fake, Command('edm2_ext.generate', ['--net', reference, '--outdir', fake] + option_args(options) + self._root())

    def run_commands(self, run_dir, reference, fake, alpha, beta, options) -> list:
        cfg = self.cfg
        train = ['--outdir', run_dir, '--data', cfg.data, '--ref', reference, '--fake', fake, '--ddo-alpha', str(alpha),
                 '--ddo-beta', str(beta), '--duration', str(cfg.duration), '--snapshot', str(cfg.eval_every)]
        evaluate = {k: v for k, v in cfg.evaluate.items() if k in ('seeds', 'batch', 'steps')}
        evaluate_args = ['--net', run_dir, '--ref', cfg.evaluate['reference'], '--dest', f'{run_dir}/eval.json',
                         '--metrics', cfg.evaluate['metric']] + option_args(evaluate)
        if 'detector' in cfg.evaluate:
            evaluate_args += ['--detector', f'{cfg.evaluate["metric"]}={cfg.evaluate["detector"]}']
        # Upstream refuses to resume a finished run, so a rerun skips training once its last state exists.
        final_state = f'{run_dir}/training-state-{cfg.duration // 1000:07d}.pt'
        return [Command('edm2_ext.train', train + option_args(options) + self._root(), done_if=final_state),
                Command('edm2_ext.evaluate', evaluate_args + self._root())]

    def images_per_run(self, options) -> int:
        return self.cfg.duration

    def collect(self, run_dir) -> dict:
        """{'evaluations': [{step, snapshot, score}], 'error': str or None}; step = kimg, as in the snapshot names."""
        for row in _json_lines(os.path.join(run_dir, 'stats.jsonl')):
            if 'Loss/loss' in row and not math.isfinite(_scalar(row['Loss/loss'])):
                return dict(evaluations=[], error=f'non-finite loss ({_scalar(row["Loss/loss"])}) at {_scalar(row.get("Progress/kimg", 0)):g} kimg')
        path = os.path.join(run_dir, 'eval.json')
        if not os.path.isfile(path):
            return dict(evaluations=[], error=f'no evaluation results ({path} is missing)')
        with open(path) as f:
            report = json.load(f)
        metric = self.cfg.evaluate['metric']
        evaluations = [dict(step=int(self.snapshot_pattern.fullmatch(row['snapshot']).group(1)),
                            snapshot=os.path.join(run_dir, row['snapshot']), score=row[metric]) for row in report['results']]
        return dict(evaluations=evaluations, error=None)


class VAR:
    name = 'var'
    step_unit = 'iterations'

    def __init__(self, cfg):
        self.cfg = cfg

    def validate(self):
        if self.cfg.duration < 2:
            raise DDOPatchError(f'{self.cfg.source}: run.duration (iterations) must be >= 2 for VAR\'s schedule')

    def _score_key(self):
        cfg_scale = self.cfg.evaluate.get('cfg', 1.5)
        return 'cfg=0' if self.cfg.evaluate.get('best_by', 'free') == 'free' or not cfg_scale else f'cfg={cfg_scale:g}'

    def metric_label(self):
        return f'{self.cfg.evaluate["metric"]} ({self._score_key()})'

    def reference_samples(self, round_dir, reference) -> tuple:
        return None, None   # sampled online, from the same labels as each real batch

    def run_commands(self, run_dir, reference, fake, alpha, beta, options) -> list:
        cfg = self.cfg
        evaluate = {'eval_' + k: v for k, v in cfg.evaluate.items() if k in ('samples', 'cfg', 'batch')}
        if 'best_by' in cfg.evaluate:
            evaluate['best_by'] = cfg.evaluate['best_by']
        args = ['--outdir', run_dir, '--ckpt', reference, '--ddo-alpha', str(alpha), '--ddo-beta', str(beta),
                '--iterations', str(cfg.duration), '--eval-every', str(cfg.eval_every), '--metric', cfg.evaluate['metric']]
        args += (['--data', cfg.data] if cfg.data else []) + option_args(evaluate) + option_args(options)
        return [Command('var_ext.train', args + (['--var-root', cfg.upstream_root] if cfg.upstream_root else []))]

    def images_per_run(self, options) -> int:
        return self.cfg.duration * int(options.get('global_batch', 1024))

    def collect(self, run_dir) -> dict:
        """{'evaluations': [{step, snapshot, score}], 'error'}; step = iterations. Only the best checkpoint
        is kept, so every evaluation names var-ddo-best.pth and only the best one is really there."""
        for row in _json_lines(os.path.join(run_dir, 'log.jsonl')):
            if not math.isfinite(row.get('loss', 0.0)):
                return dict(evaluations=[], error=f'non-finite loss ({row["loss"]}) at iteration {row["iteration"]}')
        rows = {row['iteration']: row for row in _json_lines(os.path.join(run_dir, 'metrics.jsonl'))}  # a resumed run may repeat one
        if not rows:
            return dict(evaluations=[], error=f'no evaluations in {run_dir}/metrics.jsonl')
        best_file = os.path.join(run_dir, 'var-ddo-best.pth')
        return dict(evaluations=[dict(step=it, snapshot=best_file, score=rows[it][self._score_key()]) for it in sorted(rows)],
                    error=None)


BACKENDS = {'edm2': EDM2, 'var': VAR}


def backend_for(cfg):
    backend = BACKENDS[cfg.backend](cfg)
    backend.validate()
    return backend
