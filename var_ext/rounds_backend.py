"""The round manager's VAR backend (`backend = "var_ext.rounds_backend.RoundsBackend"`).

Per sweep point `var_ext.train --no-initial-eval`, which samples its reference online from the batch's
labels, evaluates every run.eval_every iterations itself at each guidance scale of evaluate.cfg
(`metrics.jsonl`, each row with one score per scale and the `score` of evaluate.select_cfg, which selects)
and keeps `var-ddo-best.pth`; the reference is scored once per round by `var_ext.evaluate`, on the same
seeds (0 .. evaluate.samples - 1) and scales. The manifest records every scale's score of every evaluation
(`scores`) besides the selecting `score`. Steps are iterations.
"""

from __future__ import annotations

import json
import math
import os

from ddo_patch.errors import DDOPatchError
from ddo_patch.rounds.backend import Backend, Command, json_lines, latest_per_step, option_args
from ddo_patch.rounds.manifest import read_json
from ddo_patch.seeds import parse_seeds
from var_ext import run_files


ROUND_SEED_STRIDE = 1000


class RoundsBackend(Backend):
    name = 'var'
    step_unit = 'iterations'
    train_options = ('depth', 'vae', 'patch_nums', 'num_classes', 'vae_vocab', 'vae_ch', 'vae_z', 'dataset', 'workers',
                     'label_drop', 'global_batch', 'batch_gpu', 'lr', 'schedule', 'warmup', 'wp0', 'wpe', 'wd',
                     'grad_clip', 'amp', 'max_nonfinite', 'seed', 'log_every')
    evaluate_options = ('metric', 'samples', 'cfg', 'select_cfg', 'batch', 'report_seeds', 'noise_seeds')
    ddo_image_cost = 3.4   # measured with its online reference sampling: benchmarks/step_cost.py --backend var
    model_options = ('depth', 'vae', 'patch_nums', 'num_classes', 'vae_vocab', 'vae_ch', 'vae_z')   # var_ext.options
    file_options = ('vae',)

    def validate(self):
        cfg = self.cfg
        if cfg.duration < 2:
            raise cfg.error('run.duration (iterations) must be >= 2 for VAR\'s schedule')
        if ':' not in str(cfg.evaluate['metric']):
            raise cfg.error(f'evaluate.metric must be MODULE:FUNCTION for var, got {cfg.evaluate["metric"]!r}')
        if cfg.data is None and 'dataset' not in cfg.train:
            raise cfg.error('var needs data (an ImageFolder root) or train.dataset (MODULE:FUNCTION)')
        try:
            self._score_key()
            roles = {'the evaluation seeds (0 .. evaluate.samples - 1)': parse_seeds(self.evaluation_seeds('select'))}
        except DDOPatchError as err:
            raise cfg.error(str(err)) from None
        self.check_report_seeds(roles)

    def metric_label(self):
        return f'{self.cfg.evaluate["metric"]} ({self._score_key()})'

    def _scales(self) -> tuple:
        return run_files.parse_scales(self.cfg.evaluate.get('cfg', run_files.DEFAULT_EVAL_CFG))

    def _select_cfg(self) -> float:
        value = self.cfg.evaluate.get('select_cfg', run_files.DEFAULT_SELECT_CFG)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DDOPatchError(f'evaluate.select_cfg must be one of the guidance scales of evaluate.cfg, got {value!r}') from None

    def _score_key(self):
        return run_files.check_selected(self._scales(), self._select_cfg(), 'evaluate.cfg/evaluate.select_cfg')

    def _scale_options(self, scales_option) -> list:
        """The evaluated scales and the selecting one, as var_ext.train (--eval-cfg) and var_ext.evaluate (--cfg) take them."""
        return [scales_option, run_files.format_scales(self._scales()), '--select-cfg', f'{self._select_cfg():g}']

    def _root(self):
        return ['--var-root', self.cfg.upstream_root] if self.cfg.upstream_root else []

    def evaluation_seeds(self, purpose) -> str:
        if purpose in ('report', 'noise'):
            return str(self.cfg.evaluate[f'{purpose}_seeds'])
        return f'0-{int(self.cfg.evaluate.get("samples", 50000)) - 1}'   # var_ext.train's --eval-samples

    def evaluation(self, snapshot, dest, purpose, options) -> Command:
        evaluate = self.cfg.evaluate
        args = ['--net', snapshot, '--dest', dest, '--metric', evaluate['metric'], '--seeds', self.evaluation_seeds(purpose),
                *self._scale_options('--cfg')]
        args += option_args({k: v for k, v in evaluate.items() if k == 'batch'})
        args += option_args({k: v for k, v in options.items() if k in self.model_options + ('amp',)})
        return Command('var_ext.evaluate', args + self._root())

    def read_evaluation(self, path) -> float:
        with open(path) as f:
            return json.load(f)['score']

    def evaluation_scores(self, path) -> dict:
        with open(path) as f:
            return _scores(json.load(f))

    def run_commands(self, round_idx, run_dir, reference, fake, alpha, beta, options, stop_at=None, objective='ddo') -> list:
        cfg = self.cfg
        evaluate = {'eval_' + k: v for k, v in cfg.evaluate.items() if k in ('samples', 'batch')}
        loss = ['--ddo-alpha', str(alpha), '--ddo-beta', str(beta)] if objective == 'ddo' else ['--objective', objective]
        args = ['--outdir', run_dir, '--ref', reference, *loss, '--iterations', str(cfg.duration), '--eval-every', str(cfg.eval_every),
                '--metric', cfg.evaluate['metric'], '--no-initial-eval', *self._scale_options('--eval-cfg')]
        args += (['--stop-at', str(stop_at)] if stop_at else []) + (['--data', cfg.data] if cfg.data else [])
        # Round r trains with seed + 1000 (r - 1): a round that starts where the previous one did (it kept its reference)
        # draws other data batches, reference samples and masks, as EDM2's rounds draw other reference-sample seeds.
        options = dict(options, seed=int(options.get('seed', 0)) + ROUND_SEED_STRIDE * (round_idx - 1))
        args += option_args(evaluate) + option_args(options)
        return [Command('var_ext.train', args + self._root())]

    def train_images(self, options, steps) -> int:
        return steps * int(options.get('global_batch', 1024))

    def evaluation_samples(self, purpose) -> int:
        return len(parse_seeds(self.evaluation_seeds(purpose))) * len(self._scales())   # an image per seed and scale

    def sample_cost(self, kind) -> float:
        """An estimate: a KV-cached pyramid costs about one forward pass over its tokens, a third of a training
        image; a guided one twice that. Averaged over the evaluated scales."""
        return sum(2 / 3 if scale else 1 / 3 for scale in self._scales()) / len(self._scales())

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
        return dict(evaluations=[dict(step=it, snapshot=best_file, score=rows[it]['score'], scores=_scores(rows[it]))
                                 for it in sorted(rows)], error=None)

    @classmethod
    def owns(cls, run_dir) -> bool:
        options = read_json(os.path.join(run_dir, run_files.OPTIONS), {})
        return 'ddo_alpha' in options and 'label_drop' in options and os.path.isfile(os.path.join(run_dir, run_files.LOG))

    @classmethod
    def run_settings(cls, run_dir) -> dict:
        options = read_json(os.path.join(run_dir, run_files.OPTIONS), {})
        ddo = options.get('objective', 'ddo') == 'ddo'
        return dict(objective='ddo' if ddo else 'mle', alpha=options['ddo_alpha'] if ddo else None,
                    beta=options['ddo_beta'] if ddo else None)

    @classmethod
    def training_log(cls, run_dir) -> list:
        rows = [dict({k: v for k, v in row.items() if k.startswith(('DDO/', 'Loss/'))}, step=row['iteration'])
                for row in json_lines(os.path.join(run_dir, run_files.LOG))]
        return latest_per_step(rows, 'step')

    @classmethod
    def run_evaluations(cls, run_dir) -> list:
        """metrics.jsonl's selecting scores."""
        rows = latest_per_step(json_lines(os.path.join(run_dir, run_files.METRICS)), 'iteration')
        return [dict(step=row['iteration'], score=row['score']) for row in rows]


def _scores(record) -> dict:
    """{'cfg=0': score, 'cfg=1.5': score, ...} of a metrics.jsonl row or a var_ext.evaluate report."""
    return {k: v for k, v in record.items() if k.startswith('cfg=')}
