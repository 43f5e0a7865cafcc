"""What the round manager asks of a codebase, and how it finds the class that answers.

The manager knows no codebase's flags or files. A config names its backend by class, the way EDM2 names
its losses and networks (`backend = "edm2_ext.rounds_backend.RoundsBackend"`); the class lives in its
adapter, subclasses `Backend`, and answers:

- which options `[train]`, `[[override]]`, `[evaluate]` and `[reference_samples]` may hold, which of
  them name files, and what else of the config it requires (`validate`);
- the commands of a round's reference samples (from the round's own seeds), of one evaluation of a
  snapshot (the round's reference; the chosen snapshot and the control's on the report seeds; the first
  reference on the noise seeds) and of one sweep point or matched control (`reference_samples`,
  `evaluation`, `run_commands` with objective 'ddo' or 'mle'), as `Command`s that the launcher runs through
  the codebase's native launcher; a run does not evaluate its starting point, the reference;
- what a finished run or evaluation recorded: the evaluations and their scores (`collect`,
  `read_evaluation`, and `evaluation_scores` for what an evaluation scored besides the selecting score,
  e.g. VAR's score at each guidance scale). The manager takes the scores as the runs wrote them; it
  computes none itself;
- optionally, racing (`[evaluate] policy = "racing"`, `ddo_patch.rounds.race`; `races = True`): a point's job
  without its evaluation (`run_commands(..., evaluate=False)`, `collect(..., evaluated=False)`), the snapshots a
  run wrote (`snapshots`), and one race level over several snapshots (`race_evaluation`, `read_race`);
- how to read one run directory of its train entry without a config (`owns`, `run_settings`, `training_log`,
  `run_evaluations`), for the report's diagnostics and `ddo-patch inspect` (`ddo_patch.diagnostics`).
  Installed backends are listed under the entry-point group `ddo_patch.backends`, so that `inspect` finds
  the one that owns a directory without the core naming an adapter.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import NamedTuple

from ddo_patch.errors import DDOPatchError
from ddo_patch.seeds import check_disjoint, parse_seeds


class ReferenceSamples(NamedTuple):
    path: str                   # where the round's reference samples go, relative to the work directory
    seeds: str                  # their seeds, e.g. '1000000-1049999'
    command: 'Command'          # the command that makes them


@dataclasses.dataclass
class Command:
    module: str                 # python -m MODULE, under the launcher
    args: list
    done_if: str | None = None  # skip the command when this path exists (its output is complete)


class Backend:
    """The interface; see the module docstring. `cfg` is the validated `RoundsConfig`."""
    name = 'backend'                   # a short name for messages (edm2, var)
    step_unit = 'steps'                # what an evaluation's `step` counts (kimg, iterations)
    required = ()                      # top-level keys this backend needs besides `pretrained`
    train_options = ()                 # keys of [train] and [[override]]: the train entry's options
    evaluate_options = ('metric',)     # keys of [evaluate]
    reference_sample_options = ()      # keys of [reference_samples]; empty: the backend samples online
    file_options = ()                  # [train] keys that name a file, resolved like paths of the config
    evaluate_file_options = ()         # [evaluate] keys that name a file (or a URL)
    ddo_image_cost = 2.5               # MLE-image equivalents of one DDO training image (see ddo_patch.rounds.sweep)
    races = False                      # whether it scores race levels (the racing methods below)

    def __init__(self, cfg):
        self.cfg = cfg

    def validate(self) -> None:
        """Checks beyond the option names; raise `self.cfg.error(...)`."""

    def metric_label(self) -> str:
        return str(self.cfg.evaluate['metric'])

    def reference_samples(self, round_idx, round_dir, reference) -> ReferenceSamples | None:
        """The round's offline reference samples of `reference`; None when the backend samples them online."""
        return None

    def evaluation(self, snapshot, dest, purpose, options) -> Command:
        """The command that scores `snapshot` into `dest` ('select': on the evaluation seeds; 'report': on
        evaluate.report_seeds; 'noise': on evaluate.noise_seeds); `options` are the round's train options (the
        model's shape, for VAR)."""
        raise NotImplementedError

    def evaluation_seeds(self, purpose) -> str:
        """The seeds an evaluation of this purpose samples, as recorded in the manifest."""
        raise NotImplementedError

    def reports(self) -> bool:
        """Whether the config asks for a report evaluation of each round's chosen snapshot (evaluate.report_seeds)."""
        return 'report_seeds' in self.cfg.evaluate

    def measures_noise(self) -> bool:
        """Whether the config asks for the report metric's own noise: the pretrained model scored on evaluate.noise_seeds,
        as many seeds as evaluate.report_seeds and disjoint from them."""
        return 'noise_seeds' in self.cfg.evaluate

    def check_report_seeds(self, roles: dict) -> None:
        """Add the report and noise seeds (when configured) to `roles` ({what: seeds}), check that they are all
        disjoint and that the two report-size sets have the same size; raise `self.cfg.error(...)`."""
        if self.reports():
            roles['evaluate.report_seeds'] = parse_seeds(self.evaluation_seeds('report'))
        if self.measures_noise():
            if not self.reports():
                raise self.cfg.error('evaluate.noise_seeds measures the noise of the report seeds\' scores; '
                                     'give evaluate.report_seeds too')
            roles['evaluate.noise_seeds'] = parse_seeds(self.evaluation_seeds('noise'))
            if len(roles['evaluate.noise_seeds']) != len(roles['evaluate.report_seeds']):
                raise self.cfg.error(f'evaluate.noise_seeds must be as many seeds as evaluate.report_seeds (a metric such as FID '
                                     f'depends on the sample count), got {len(roles["evaluate.noise_seeds"])} and '
                                     f'{len(roles["evaluate.report_seeds"])}')
        try:
            check_disjoint(roles)
        except DDOPatchError as err:
            raise self.cfg.error(str(err)) from None

    def read_evaluation(self, path) -> float:
        raise NotImplementedError

    def evaluation_scores(self, path) -> dict:
        """Every score the evaluation at `path` recorded, by name, for the manifest ({}: only the selecting one)."""
        return {}

    def run_commands(self, round_idx, run_dir, reference, fake, alpha, beta, options, stop_at=None, objective='ddo') -> list:
        """The job of one sweep point: train (to `stop_at` steps, a rung, or to the end of the round when None;
        a later call with a larger one continues the same run), then evaluate what is new. objective 'mle': the
        round's matched control, the same job with the MLE loss (`fake`, `alpha` and `beta` are None)."""
        raise NotImplementedError

    # Racing (`races = True`): run_commands takes evaluate=False (train only) and collect evaluated=False (check the
    # training, expect no evaluations).

    def snapshots(self, run_dir, up_to) -> list:
        """[(step, path)] of the snapshots a run wrote after its start, up to step `up_to`, in step order."""
        raise NotImplementedError

    def race_evaluation(self, snapshots, samples, dest, store) -> Command:
        """The command that scores each snapshot on the first `samples` selection seeds, and without each of
        `cfg.racing['groups']` jackknife groups of them (`ddo_patch.racing`), into `dest`, keeping per-sample features
        in `store` for later levels."""
        raise NotImplementedError

    def read_race(self, path) -> dict:
        """{snapshot: {'score', 'leave_out': [score without each jackknife group]}} from a race level's `dest`."""
        raise NotImplementedError

    def evaluation_step(self, steps) -> int:
        """The `step` an evaluation of the snapshot written after `steps` steps (run.duration's unit) records."""
        return steps

    def train_images(self, options, steps) -> int:
        """Real images a run has trained on after `steps` steps (run.duration's unit)."""
        raise NotImplementedError

    def sample_cost(self, kind) -> float:
        """MLE-image equivalents of one generated sample: kind 'reference' (reference samples), 'select', 'report'."""
        raise NotImplementedError

    def evaluation_samples(self, purpose) -> int:
        """Samples one evaluation generates."""
        return len(parse_seeds(self.evaluation_seeds(purpose)))

    def evaluation_cost(self, purpose) -> float:
        return self.evaluation_samples(purpose) * self.sample_cost(purpose)

    def reference_sample_count(self, round_idx) -> int:
        return 0

    def collect(self, run_dir) -> dict:
        """{'evaluations': [{'step', 'snapshot', 'score'}, ...], 'error': None or why the run has no result}; an
        evaluation may carry more (VAR: 'scores', one per guidance scale), which the manifest records as is."""
        raise NotImplementedError

    # One run directory, read without a config (the report's diagnostics, `ddo-patch inspect`). A backend that
    # does not read its runs gets no diagnostics: these defaults own nothing and read nothing.

    @classmethod
    def owns(cls, run_dir) -> bool:
        """Whether `run_dir` was written by this backend's train entry."""
        return False

    @classmethod
    def run_settings(cls, run_dir) -> dict:
        """{'objective': 'ddo' or 'mle', 'alpha', 'beta' (None under mle)} as the run recorded its options."""
        return dict(objective='ddo', alpha=None, beta=None)

    @classmethod
    def training_log(cls, run_dir) -> list:
        """The run's logged terms as rows {'step': progress in `step_unit`, 'DDO/delta_real': mean, ...}, under the
        names `ddo_patch.losses.DDOTerms.log_values` gives them, in training order (a resumed run's repeats dropped)."""
        return []

    @classmethod
    def run_evaluations(cls, run_dir) -> list:
        """The evaluations the run directory holds, [{'step', 'score'}, ...]; [] when it holds none."""
        return []


def installed_backends() -> dict:
    """{name: Backend subclass} of the entry-point group `ddo_patch.backends` (the adapters declare theirs)."""
    from importlib.metadata import entry_points
    found = {}
    for entry in entry_points(group='ddo_patch.backends'):
        try:
            cls = entry.load()
        except ImportError:   # an adapter whose dependencies are not installed
            continue
        if isinstance(cls, type) and issubclass(cls, Backend):
            found[entry.name] = cls
    return found


def latest_per_step(rows, step_key) -> list:
    """Rows in order of `step_key`, the last one written for each step (a resumed run logs a redone step again)."""
    by_step = {row[step_key]: row for row in rows if step_key in row}
    return [by_step[step] for step in sorted(by_step)]


def load_backend_class(name: str):
    """The class a config's `backend` names, as `package.module.Class`."""
    module_name, _, class_name = str(name).rpartition('.')
    try:
        cls = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise DDOPatchError(f'unknown backend {name!r}; name a backend class, e.g. edm2_ext.rounds_backend.RoundsBackend '
                            f'or var_ext.rounds_backend.RoundsBackend')
    return cls


def option_args(options: dict, flags_as_named=()) -> list:
    """['--name-with-dashes', 'value', ...]; names in `flags_as_named` keep their spelling (EDM2's --P_mean)."""
    args = []
    for name, value in options.items():
        args += ['--' + (name if name in flags_as_named else name.replace('_', '-')), str(value)]
    return args


def json_lines(path) -> list:
    """The rows of a JSON-lines log, [] when it does not exist yet."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def point_name(alpha, beta) -> str:
    return f'a{alpha:g}_b{beta:g}'
