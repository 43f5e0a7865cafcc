"""The round manager's VAR backend (`backend = "var_ext.rounds_backend.RoundsBackend"`).

Per sweep point `var_ext.train`, which samples its reference online from the batch's labels, evaluates
every run.eval_every iterations itself (`metrics.jsonl`, each row with the `score` that selects) and
keeps `var-ddo-best.pth`. Steps are iterations.
"""

from __future__ import annotations

import math
import os

from ddo_patch.rounds.backend import Backend, Command, json_lines, option_args
from var_ext import run_files


class RoundsBackend(Backend):
    name = 'var'
    step_unit = 'iterations'
    train_options = ('depth', 'vae', 'patch_nums', 'num_classes', 'vae_vocab', 'vae_ch', 'vae_z', 'dataset', 'workers',
                     'label_drop', 'global_batch', 'batch_gpu', 'lr', 'schedule', 'warmup', 'wp0', 'wpe', 'wd',
                     'grad_clip', 'amp', 'seed', 'log_every')
    evaluate_options = ('metric', 'samples', 'cfg', 'batch', 'best_by')
    file_options = ('vae',)

    def validate(self):
        cfg = self.cfg
        if cfg.duration < 2:
            raise cfg.error('run.duration (iterations) must be >= 2 for VAR\'s schedule')
        if ':' not in str(cfg.evaluate['metric']):
            raise cfg.error(f'evaluate.metric must be MODULE:FUNCTION for var, got {cfg.evaluate["metric"]!r}')
        if cfg.data is None and 'dataset' not in cfg.train:
            raise cfg.error('var needs data (an ImageFolder root) or train.dataset (MODULE:FUNCTION)')

    def metric_label(self):
        key = run_files.score_key(self.cfg.evaluate.get('cfg', run_files.DEFAULT_EVAL_CFG), self.cfg.evaluate.get('best_by', 'free'))
        return f'{self.cfg.evaluate["metric"]} ({key})'

    def run_commands(self, run_dir, reference, fake, alpha, beta, options) -> list:
        cfg = self.cfg
        evaluate = {'eval_' + k: v for k, v in cfg.evaluate.items() if k in ('samples', 'cfg', 'batch')}
        if 'best_by' in cfg.evaluate:
            evaluate['best_by'] = cfg.evaluate['best_by']
        args = ['--outdir', run_dir, '--ref', reference, '--ddo-alpha', str(alpha), '--ddo-beta', str(beta),
                '--iterations', str(cfg.duration), '--eval-every', str(cfg.eval_every), '--metric', cfg.evaluate['metric']]
        args += (['--data', cfg.data] if cfg.data else []) + option_args(evaluate) + option_args(options)
        return [Command('var_ext.train', args + (['--var-root', cfg.upstream_root] if cfg.upstream_root else []))]

    def images_per_run(self, options) -> int:
        return self.cfg.duration * int(options.get('global_batch', 1024))

    def collect(self, run_dir) -> dict:
        """Only the best checkpoint is kept, so every evaluation names var-ddo-best.pth and only the best one is
        really there."""
        for row in json_lines(os.path.join(run_dir, run_files.LOG)):
            if not math.isfinite(row.get('Loss/loss', 0.0)):
                return dict(evaluations=[], error=f'non-finite loss ({row["Loss/loss"]}) at iteration {row["iteration"]}')
        rows = {row['iteration']: row for row in json_lines(os.path.join(run_dir, run_files.METRICS))}  # a resumed run may repeat one
        if not rows:
            return dict(evaluations=[], error=f'no evaluations in {run_dir}/{run_files.METRICS}')
        best_file = os.path.join(run_dir, run_files.BEST)
        return dict(evaluations=[dict(step=it, snapshot=best_file, score=rows[it]['score']) for it in sorted(rows)], error=None)
