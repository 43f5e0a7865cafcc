"""The round manager's EDM2 backend (`backend = "edm2_ext.rounds_backend.RoundsBackend"`).

Per round: the reference samples once with `edm2_ext.generate`, from the round's own seeds
(`[reference_samples] count` seeds from `first_seed + (round - 1) * count`, disjoint from the evaluation
seeds); per sweep point `edm2_ext.train --round N` (the preset's schedule for round N; a snapshot every
run.eval_every images) then `edm2_ext.evaluate --skip-initial` (every snapshot but the kimg-0 one, into
`eval.json`: the reference itself is evaluated once per round by the manager). Steps are kimg, as in
upstream's snapshot names; the chosen snapshot is a `network-snapshot-*.pkl`.
"""

from __future__ import annotations

import json
import math
import os

from ddo_patch.errors import DDOPatchError
from ddo_patch.rounds.backend import Backend, Command, ReferenceSamples, json_lines, latest_per_step, option_args
from ddo_patch.rounds.manifest import read_json
from ddo_patch.seeds import parse_seeds, seed_range
from edm2_ext import options, run_files

FLAGS_AS_NAMED = ('P_mean', 'P_std')   # EDM2's own spelling; every other option is --name-with-dashes


def _args(options: dict) -> list:
    return option_args(options, FLAGS_AS_NAMED)


class RoundsBackend(Backend):
    name = 'edm2'
    step_unit = 'kimg'
    required = ('data',)
    train_options = ('preset', 'cond', 'batch', 'lr', 'decay', 'rampup', 'P_mean', 'P_std', 'ema_std', 'batch_gpu',
                     'workers', 'status', 'checkpoint', 'max_nonfinite', 'seed', 'precision')
    evaluate_options = ('metric', 'reference', 'detector', 'seeds', 'report_seeds', 'noise_seeds', 'batch', 'steps')
    reference_sample_options = ('count', 'first_seed', 'batch', 'steps')
    evaluate_file_options = ('reference',)
    races = True

    def validate(self):
        cfg = self.cfg
        if 'reference' not in cfg.evaluate:
            raise cfg.error('evaluate.reference (reference statistics of the data, a .pkl path or URL) is required for edm2')
        if cfg.eval_every % 1024:
            raise cfg.error(f'run.eval_every must be a multiple of 1024 images (EDM2 snapshots), got {cfg.eval_every}')
        if cfg.duration % cfg.eval_every:
            raise cfg.error(f'run.duration {cfg.duration} must be a multiple of run.eval_every {cfg.eval_every}, '
                            f'so that the last step is evaluated')
        offered = options.offered_precisions()
        for values in [cfg.train] + [values for _, values in cfg.overrides] + [cfg.control.get('options', {})]:
            if 'precision' in values and values['precision'] not in offered:
                raise cfg.error(f'train.precision must be one of {", ".join(offered)} (the modes measured to keep DDO\'s gain, '
                                f'docs/edm2.md), got {values["precision"]!r}')
        if any(str(values.get('checkpoint', 1)) in ('0', '0Ki', '0Mi') for values in
               [cfg.train] + [values for _, values in cfg.overrides]):
            raise cfg.error('train.checkpoint must not be 0: the manager resumes runs from their checkpoints')
        count, first = self._reference_seed_plan()
        if not (isinstance(count, int) and count >= 2 and isinstance(first, int) and first >= 0):
            raise cfg.error(f'reference_samples.count must be an integer >= 2 and first_seed one >= 0, got {count!r}, {first!r}')
        try:
            roles = {'evaluate.seeds': parse_seeds(self.evaluation_seeds('select')),
                     f'the reference samples of rounds 1-{cfg.rounds}': range(first, first + cfg.rounds * count)}
        except DDOPatchError as err:
            raise cfg.error(str(err)) from None
        self.check_report_seeds(roles)

    def _reference_seed_plan(self) -> tuple:
        """(samples per round, the first seed of round 1): round r samples seeds first + (r - 1) * count onwards."""
        return self.cfg.reference_samples.get('count', 50000), self.cfg.reference_samples.get('first_seed', 1_000_000)

    def _root(self):
        return ['--edm2-root', self.cfg.upstream_root] if self.cfg.upstream_root else []

    def reference_samples(self, round_idx, round_dir, reference) -> ReferenceSamples:
        count, first = self._reference_seed_plan()
        seeds = seed_range(first + (round_idx - 1) * count, count)
        fake = f'{round_dir}/reference-samples.zip'
        options = {'seeds': seeds, **{k: v for k, v in self.cfg.reference_samples.items() if k in ('batch', 'steps')}}
        return ReferenceSamples(fake, seeds, Command('edm2_ext.generate', ['--net', reference, '--outdir', fake] + _args(options) + self._root()))

    def evaluation_seeds(self, purpose) -> str:
        if purpose in ('report', 'noise'):
            return str(self.cfg.evaluate[f'{purpose}_seeds'])
        return str(self.cfg.evaluate.get('seeds', '0-49999'))

    def _evaluate_args(self, net, dest, seeds) -> list:
        evaluate = self.cfg.evaluate
        args = ['--net', net, '--ref', evaluate['reference'], '--dest', dest, '--metrics', evaluate['metric'], '--seeds', seeds]
        args += _args({k: v for k, v in evaluate.items() if k in ('batch', 'steps')})
        if 'detector' in evaluate:
            args += ['--detector', f'{evaluate["metric"]}={evaluate["detector"]}']
        return args + self._root()

    def evaluation(self, snapshot, dest, purpose, options) -> Command:
        return Command('edm2_ext.evaluate', self._evaluate_args(snapshot, dest, self.evaluation_seeds(purpose)))

    def read_evaluation(self, path) -> float:
        with open(path) as f:
            return json.load(f)['results'][0][self.cfg.evaluate['metric']]

    def run_commands(self, round_idx, run_dir, reference, fake, alpha, beta, options, stop_at=None, objective='ddo',
                     evaluate=True) -> list:
        """A rung trains with --duration = the rung: EDM2's learning rate and EMA do not depend on the total, so
        the next stage, with a larger --duration, resumes from the rung's checkpoint as if never stopped."""
        cfg = self.cfg
        duration = stop_at or cfg.duration
        loss = ['--objective', objective] if objective != 'ddo' else \
            ['--fake', fake, '--ddo-alpha', str(alpha), '--ddo-beta', str(beta)]
        train = ['--outdir', run_dir, '--data', cfg.data, '--ref', reference, *loss, '--round', str(round_idx),
                 '--duration', str(duration), '--snapshot', str(cfg.eval_every)]
        evaluate = self._evaluate_args(run_dir, f'{run_dir}/{run_files.EVALUATION}', self.evaluation_seeds('select'))
        # Upstream refuses to resume a finished run, so a rerun skips training once its last state exists.
        final_state = f'{run_dir}/{run_files.training_state(duration // 1000)}'
        return [Command('edm2_ext.train', train + _args(options) + self._root(), done_if=final_state)] + \
            ([Command('edm2_ext.evaluate', evaluate + ['--skip-initial'])] if evaluate else [])

    def snapshots(self, run_dir, up_to) -> list:
        return [(run_files.snapshot_kimg(path), path) for path in run_files.list_snapshots(run_dir)
                if 0 < run_files.snapshot_kimg(path) <= self.evaluation_step(up_to)]

    def race_evaluation(self, snapshots, samples, dest, store) -> Command:
        first = parse_seeds(self.evaluation_seeds('select'))[:samples]   # each level extends the one before
        seeds = seed_range(first[0], samples) if first[-1] - first[0] == samples - 1 else ','.join(map(str, first))
        args = self._evaluate_args(snapshots[0], dest, seeds)
        for snapshot in snapshots[1:]:
            args += ['--net', snapshot]
        return Command('edm2_ext.evaluate', args + ['--race-store', store, '--groups', str(self.cfg.racing['groups'])])

    def read_race(self, path) -> dict:
        with open(path) as f:
            return {row['snapshot']: row for row in json.load(f)['results']}

    def evaluation_step(self, steps) -> int:
        """Snapshots are named by kimg, images // 1000, as upstream names them."""
        return steps // 1000

    def train_images(self, options, steps) -> int:
        return steps

    def sample_cost(self, kind) -> float:
        """One sample is 2 steps - 1 network evaluations of EDM's Heun sampler, a third of a training image each."""
        table = self.cfg.reference_samples if kind == 'reference' else self.cfg.evaluate
        return (2 * int(table.get('steps', 32)) - 1) / 3

    def reference_sample_count(self, round_idx) -> int:
        return self._reference_seed_plan()[0]

    def collect(self, run_dir, evaluated=True) -> dict:
        for row in json_lines(os.path.join(run_dir, run_files.STATS)):
            if 'Loss/loss' in row and not math.isfinite(row['Loss/loss']):   # upstream writes each statistic's mean
                return dict(evaluations=[], error=f'non-finite loss ({row["Loss/loss"]}) at {row.get("Progress/kimg", 0):g} kimg')
        if not evaluated:
            return dict(evaluations=[], error=None)
        path = os.path.join(run_dir, run_files.EVALUATION)
        if not os.path.isfile(path):
            return dict(evaluations=[], error=f'no evaluation results ({path} is missing)')
        with open(path) as f:
            report = json.load(f)
        metric = self.cfg.evaluate['metric']
        evaluations = [dict(step=run_files.snapshot_kimg(row['snapshot']), snapshot=os.path.join(run_dir, row['snapshot']),
                            score=row[metric]) for row in report['results']]
        return dict(evaluations=evaluations, error=None)

    @classmethod
    def _loss_kwargs(cls, run_dir) -> dict:
        return read_json(os.path.join(run_dir, run_files.OPTIONS), {}).get('loss_kwargs', {})

    @classmethod
    def owns(cls, run_dir) -> bool:
        return str(cls._loss_kwargs(run_dir).get('class_name', '')).startswith('edm2_ext.loss.')

    @classmethod
    def run_settings(cls, run_dir) -> dict:
        kwargs = cls._loss_kwargs(run_dir)
        ddo = kwargs.get('class_name') == 'edm2_ext.loss.DDOLoss'
        return dict(objective='ddo' if ddo else 'mle', alpha=kwargs.get('alpha') if ddo else None,
                    beta=kwargs.get('beta') if ddo else None)

    @classmethod
    def training_log(cls, run_dir) -> list:
        """stats.jsonl's status rows (each statistic's mean over the interval), stepped in kimg."""
        rows = [dict({k: v for k, v in row.items() if k.startswith(('DDO/', 'Loss/'))}, step=row['Progress/kimg'])
                for row in json_lines(os.path.join(run_dir, run_files.STATS)) if 'Loss/loss' in row]
        return latest_per_step(rows, 'step')

    @classmethod
    def run_evaluations(cls, run_dir) -> list:
        """eval.json's scores of the first metric it computed (`edm2_ext.evaluate --dest RUN_DIR/eval.json`)."""
        path = os.path.join(run_dir, run_files.EVALUATION)
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            report = json.load(f)
        metric = report['settings']['metrics'][0]
        return [dict(step=run_files.snapshot_kimg(row['snapshot']), score=row[metric]) for row in report['results']]
