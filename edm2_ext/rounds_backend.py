"""The round manager's EDM2 backend (`backend = "edm2_ext.rounds_backend.RoundsBackend"`).

Per round: the reference samples once with `edm2_ext.generate`; per sweep point `edm2_ext.train`
(a snapshot every run.eval_every images) then `edm2_ext.evaluate` (every snapshot, into `eval.json`).
Steps are kimg, as in upstream's snapshot names; the chosen snapshot is a `network-snapshot-*.pkl`.
"""

from __future__ import annotations

import json
import math
import os

from ddo_patch.rounds.backend import Backend, Command, json_lines, option_args
from edm2_ext import run_files

FLAGS_AS_NAMED = ('P_mean', 'P_std')   # EDM2's own spelling; every other option is --name-with-dashes


def _args(options: dict) -> list:
    return option_args(options, FLAGS_AS_NAMED)


class RoundsBackend(Backend):
    name = 'edm2'
    step_unit = 'kimg'
    required = ('data',)
    train_options = ('preset', 'cond', 'batch', 'lr', 'decay', 'rampup', 'P_mean', 'P_std', 'ema_std', 'batch_gpu',
                     'workers', 'status', 'checkpoint', 'seed')
    evaluate_options = ('metric', 'reference', 'detector', 'seeds', 'batch', 'steps')
    reference_sample_options = ('seeds', 'batch', 'steps')
    evaluate_file_options = ('reference',)

    def validate(self):
        cfg = self.cfg
        if 'reference' not in cfg.evaluate:
            raise cfg.error('evaluate.reference (reference statistics of the data, a .pkl path or URL) is required for edm2')
        if cfg.eval_every % 1024:
            raise cfg.error(f'run.eval_every must be a multiple of 1024 images (EDM2 snapshots), got {cfg.eval_every}')
        if cfg.duration % cfg.eval_every:
            raise cfg.error(f'run.duration {cfg.duration} must be a multiple of run.eval_every {cfg.eval_every}, '
                            f'so that the last step is evaluated')
        if any(str(options.get('checkpoint', 1)) in ('0', '0Ki', '0Mi') for options in
               [cfg.train] + [values for _, values in cfg.overrides]):
            raise cfg.error('train.checkpoint must not be 0: the manager resumes runs from their checkpoints')

    def _root(self):
        return ['--edm2-root', self.cfg.upstream_root] if self.cfg.upstream_root else []

    def reference_samples(self, round_dir, reference) -> tuple:
        fake = f'{round_dir}/reference-samples.zip'
        options = {'seeds': '0-49999', **self.cfg.reference_samples}
        return fake, Command('edm2_ext.generate', ['--net', reference, '--outdir', fake] + _args(options) + self._root())

    def run_commands(self, run_dir, reference, fake, alpha, beta, options) -> list:
        cfg = self.cfg
        train = ['--outdir', run_dir, '--data', cfg.data, '--ref', reference, '--fake', fake, '--ddo-alpha', str(alpha),
                 '--ddo-beta', str(beta), '--duration', str(cfg.duration), '--snapshot', str(cfg.eval_every)]
        evaluate = {k: v for k, v in cfg.evaluate.items() if k in ('seeds', 'batch', 'steps')}
        evaluate_args = ['--net', run_dir, '--ref', cfg.evaluate['reference'], '--dest', f'{run_dir}/{run_files.EVALUATION}',
                         '--metrics', cfg.evaluate['metric']] + _args(evaluate)
        if 'detector' in cfg.evaluate:
            evaluate_args += ['--detector', f'{cfg.evaluate["metric"]}={cfg.evaluate["detector"]}']
        # Upstream refuses to resume a finished run, so a rerun skips training once its last state exists.
        final_state = f'{run_dir}/{run_files.training_state(cfg.duration // 1000)}'
        return [Command('edm2_ext.train', train + _args(options) + self._root(), done_if=final_state),
                Command('edm2_ext.evaluate', evaluate_args + self._root())]

    def images_per_run(self, options) -> int:
        return self.cfg.duration

    def collect(self, run_dir) -> dict:
        for row in json_lines(os.path.join(run_dir, run_files.STATS)):
            if 'Loss/loss' in row and not math.isfinite(row['Loss/loss']):   # upstream writes each statistic's mean
                return dict(evaluations=[], error=f'non-finite loss ({row["Loss/loss"]}) at {row.get("Progress/kimg", 0):g} kimg')
        path = os.path.join(run_dir, run_files.EVALUATION)
        if not os.path.isfile(path):
            return dict(evaluations=[], error=f'no evaluation results ({path} is missing)')
        with open(path) as f:
            report = json.load(f)
        metric = self.cfg.evaluate['metric']
        evaluations = [dict(step=run_files.snapshot_kimg(row['snapshot']), snapshot=os.path.join(run_dir, row['snapshot']),
                            score=row[metric]) for row in report['results']]
        return dict(evaluations=evaluations, error=None)
