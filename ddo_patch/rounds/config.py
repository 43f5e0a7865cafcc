"""The round manager's run description: one TOML file, checked completely before anything runs.

    backend = "edm2_ext.rounds_backend.RoundsBackend"   # or var_ext.rounds_backend.RoundsBackend
    rounds = 24                          # at most this many rounds
    pretrained = "edm2-img64-s.pkl"      # round 1's reference (a path, or a URL for edm2)
    data = "datasets/img64.zip"          # real data (edm2: --data; var: --data, or train.dataset)
    pretraining_images = 1073741824      # what the pretrained model saw, for the cost report

    [run]                                # every sweep point of every round
    duration = "6400Ki"                  # edm2: images (--duration); var: iterations (--iterations)
    eval_every = "128Ki"                 # edm2: images between snapshots; var: iterations

    [sweep]                              # the grid alpha x beta, run in this order
    alpha = [0.5, 1, 2, 4, 6]
    beta = [0.01, 0.02, 0.05, 0.1]
    policy = "halving"                   # optional: successive halving at these rungs (default "grid": all
    rungs = ["800Ki", "1600Ki"]          # points run the whole round), keeping the better `keep` fraction;
    keep = 0.5                           # carry = true: round n+1 sweeps round n's choice and its neighbours

    [train]                              # more options of the backend's train entry (its names)
    preset = "ddo-img64-s"

    [[override]]                         # train options from a round on (later entries win)
    from_round = 17
    P_std = 3.0
    lr = 2e-5

    [control]                            # optional: the matched control, one more run per round
    objective = "mle"                    # the same run as a sweep point, with upstream's MLE loss; never promoted
    start = "reference"                  # or "control": from the control's own choice of the previous round
    label_drop = 0.1                     # train options for the control alone (here VAR's pretraining rate)

    [evaluate]  [reference_samples]  [stop]  [launcher]   (see docs/rounds.md)

Relative paths are relative to the config file; `${VAR}` is taken from the environment. Which options
[train], [evaluate] and [reference_samples] may hold, and what else a backend requires, the backend class
says (`ddo_patch.rounds.backend`); this module checks the rest.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys

from ddo_patch.errors import DDOPatchError
from ddo_patch.racing import DEFAULT_GROUPS, DEFAULT_THRESHOLD
from ddo_patch.rounds.backend import load_backend_class
from ddo_patch.sizes import parse_nimg

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LAUNCHERS = ('local', 'slurm')
# What may change between invocations on the same work directory (everything else would mix two runs).
CHANGEABLE = ('rounds', 'stop', 'launcher')


_TEMPLATE_FIELD = re.compile(r'\{\{(\w+)\}\}')
TEMPLATE_FIELDS = ('job_name', 'nodes', 'nproc_per_node', 'log', 'commands')
DEFAULT_TEMPLATE = '#!/bin/bash\n{{commands}}\n'
# Seconds before a SLURM job's time limit (or a preemption) at which it is warned (sbatch --signal=B:USR1@lead): enough
# for the step in progress and a checkpoint write of a paper-size model; 0: no warning.
DEFAULT_SIGNAL_LEAD = 300


@dataclasses.dataclass
class RoundsConfig:
    source: str                  # the config file
    backend: str                 # the backend class, package.module.Class
    rounds: int
    pretrained: str
    data: str | None
    pretraining_images: int | None
    duration: int                # edm2: images per run; var: iterations per run
    eval_every: int
    alphas: list
    betas: list
    sweep: dict                  # policy ('grid', 'halving' or 'random'), rungs (steps, increasing), keep, carry, count, seed
    train: dict
    overrides: list              # [(from_round, {option: value})], sorted
    control: dict                # {} or objective ('mle'), start ('reference' or 'control'), options (train options)
    evaluate: dict
    racing: dict                 # {} (every snapshot on every selection seed) or samples (levels), threshold, groups
    reference_samples: dict
    stop: dict                   # min_improvement, patience
    launcher: dict               # kind, nodes, nproc_per_node, env, template, poll_seconds
    upstream_root: str | None

    def round_options(self, round_idx: int) -> dict:
        """[train] with every [[override]] whose from_round <= round_idx applied, in order."""
        options = dict(self.train)
        for first, values in self.overrides:
            if round_idx >= first:
                options.update(values)
        return options

    def control_options(self, round_idx: int) -> dict:
        """The control's train options in round `round_idx`: the round's, with [control]'s own on top."""
        return dict(self.round_options(round_idx), **self.control['options'])

    def as_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def make_backend(self):
        return load_backend_class(self.backend)(self)

    def error(self, message) -> DDOPatchError:
        """A one-line error about this config file (for the backends' checks)."""
        return DDOPatchError(f'{self.source}: {message}')

    def identity(self) -> dict:
        """The part of the configuration that must not change while a work directory is in progress."""
        return {k: v for k, v in self.as_dict().items() if k not in CHANGEABLE + ('source',)}


def _fail(path, message):
    raise DDOPatchError(f'{path}: {message}')


def _expand(path, value, base):
    """${VAR} from the environment, ~, and a path relative to the config file's directory; URLs kept."""
    text = str(value)
    for name in re.findall(r'\$\{(\w+)\}', text):
        if name not in os.environ:
            _fail(path, f'"{text}" uses ${{{name}}}, which is not set in the environment')
    text = os.path.expanduser(os.path.expandvars(text))
    if '://' in text or os.path.isabs(text):
        return text
    return os.path.normpath(os.path.join(base, text))


def _number(path, where, value, minimum=None, open_min=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(path, f'{where} must be a finite number, got {value!r}')
    if minimum is not None and (value < minimum or (open_min and value == minimum)):
        _fail(path, f'{where} must be {">" if open_min else ">="} {minimum}, got {value}')
    return value


def _known(path, table, name, allowed):
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        _fail(path, f'unknown {name} option{"s" if len(unknown) > 1 else ""} {", ".join(unknown)}; '
                    f'known: {", ".join(allowed)}')


def _grid(path, sweep, name, minimum, open_min):
    values = sweep.get(name)
    if not isinstance(values, list) or not values:
        _fail(path, f'sweep.{name} must be a non-empty list of numbers (the grid would be empty)')
    for value in values:
        _number(path, f'sweep.{name} value', value, minimum, open_min)
    if len(set(values)) != len(values):
        _fail(path, f'sweep.{name} lists a value twice: {values}')
    return list(values)


def _sweep_policy(path, sweep, duration, eval_every) -> dict:
    """[sweep] policy, rungs, keep, carry, count, seed, checked (see ddo_patch.rounds.sweep)."""
    policy = dict(policy=sweep.get('policy', 'grid'), rungs=[], keep=sweep.get('keep', 0.5), carry=sweep.get('carry', False),
                  count=sweep.get('count'), seed=sweep.get('seed', 0))
    if policy['policy'] not in ('grid', 'halving', 'random'):
        _fail(path, f'unknown sweep.policy {policy["policy"]!r}; choose grid (every point runs the whole round), halving '
                    f'or random (count points of the grid)')
    if not isinstance(policy['carry'], bool):
        _fail(path, f'sweep.carry must be true or false, got {policy["carry"]!r}')
    if policy['policy'] != 'halving' and ('rungs' in sweep or 'keep' in sweep):
        _fail(path, 'sweep.rungs and sweep.keep are for policy = "halving"')
    if policy['policy'] != 'random' and ('count' in sweep or 'seed' in sweep):
        _fail(path, 'sweep.count and sweep.seed are for policy = "random"')
    if policy['policy'] == 'random':
        for key in ('count', 'seed'):
            if not isinstance(policy[key], int) or isinstance(policy[key], bool) or policy[key] < (1 if key == 'count' else 0):
                _fail(path, f'sweep.policy = "random" needs sweep.{key}, an integer >= {1 if key == "count" else 0}, '
                            f'got {policy[key]!r}')
        if policy['carry']:
            _fail(path, 'sweep.carry is for the grid and halving (a random subset ignores the last choice)')
    if policy['policy'] != 'halving':
        return policy
    if not isinstance(sweep.get('rungs'), list) or not sweep['rungs']:
        _fail(path, f'sweep.policy = "halving" needs sweep.rungs, the steps at which to compare points, e.g. '
                    f'[{duration // 4}, {duration // 2}] (multiples of run.eval_every, below run.duration)')
    policy['rungs'] = [_size(path, 'sweep.rungs value', value) for value in sweep['rungs']]
    if any(b <= a for a, b in zip(policy['rungs'], policy['rungs'][1:])) or not 0 < policy['rungs'][0] or \
            policy['rungs'][-1] >= duration or any(rung % eval_every for rung in policy['rungs']):
        _fail(path, f'sweep.rungs must increase, be multiples of run.eval_every {eval_every} and lie below run.duration '
                    f'{duration}, got {sweep["rungs"]}')
    _number(path, 'sweep.keep', policy['keep'], 0, open_min=True)
    if policy['keep'] >= 1:
        _fail(path, f'sweep.keep is the fraction of points kept at each rung, in (0, 1), got {policy["keep"]}')
    return policy


RACING_OPTIONS = ('policy', 'race_samples', 'race_threshold', 'race_groups')


def _racing(path, evaluate, backend_cls) -> dict:
    """[evaluate] policy = "racing" and its race_* options, taken out of `evaluate` (see ddo_patch.racing); {} for
    policy "full", the default: every snapshot on every selection seed."""
    table = {key: evaluate.pop(key) for key in RACING_OPTIONS if key in evaluate}
    policy = table.pop('policy', 'full')
    if policy not in ('full', 'racing'):
        _fail(path, f'unknown evaluate.policy {policy!r}; choose full (every snapshot on every seed) or racing')
    if policy == 'full':
        if table:
            _fail(path, f'{", ".join("evaluate." + k for k in table)} are for evaluate.policy = "racing"')
        return {}
    if not backend_cls.races:
        _fail(path, f'evaluate.policy = "racing" needs a backend that scores race levels; {backend_cls.name} does not '
                    f'(use policy = "full")')
    samples = table.get('race_samples')
    if not (isinstance(samples, list) and samples and all(isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in samples)
            and all(b > a for a, b in zip(samples, samples[1:]))):
        _fail(path, f'evaluate.race_samples must be increasing sample counts >= 2 below the selection seeds\' count, '
                    f'e.g. [2000, 8000], got {samples!r}')
    threshold = _number(path, 'evaluate.race_threshold', table.get('race_threshold', DEFAULT_THRESHOLD), 0, open_min=True)
    if threshold >= 1:
        _fail(path, f'evaluate.race_threshold is a probability in (0, 1), got {threshold}')
    groups = table.get('race_groups', DEFAULT_GROUPS)
    if not isinstance(groups, int) or isinstance(groups, bool) or not 2 <= groups <= samples[0]:
        _fail(path, f'evaluate.race_groups (jackknife groups) must be an integer from 2 to the first level\'s {samples[0]} '
                    f'samples, got {groups!r}')
    return dict(samples=samples, threshold=threshold, groups=groups)


def _size(path, where, value):
    try:
        return parse_nimg(value)
    except DDOPatchError as err:
        _fail(path, f'{where}: {err}')


def _launcher(path, raw):
    _known(path, raw, 'launcher', ('kind', 'nodes', 'nproc_per_node', 'env', 'template', 'poll_seconds', 'signal_lead'))
    launcher = dict(kind=raw.get('kind', 'local'), nodes=raw.get('nodes', 1), nproc_per_node=raw.get('nproc_per_node', 1),
                    env={str(k): str(v) for k, v in raw.get('env', {}).items()}, template=raw.get('template', DEFAULT_TEMPLATE),
                    poll_seconds=raw.get('poll_seconds', 60), signal_lead=raw.get('signal_lead', DEFAULT_SIGNAL_LEAD))
    if launcher['kind'] not in LAUNCHERS:
        _fail(path, f'unknown launcher.kind "{launcher["kind"]}"; choose one of {", ".join(LAUNCHERS)}')
    for key, least in (('nodes', 1), ('nproc_per_node', 1), ('signal_lead', 0)):
        if not isinstance(launcher[key], int) or isinstance(launcher[key], bool) or launcher[key] < least:
            _fail(path, f'launcher.{key} must be an integer >= {least}, got {launcher[key]!r}')
    if launcher['kind'] == 'local' and launcher['nodes'] != 1:
        _fail(path, 'launcher.nodes > 1 needs launcher.kind = "slurm" (the local launcher runs on this node)')
    _number(path, 'launcher.poll_seconds', launcher['poll_seconds'], 0, open_min=True)
    fields = set(_TEMPLATE_FIELD.findall(launcher['template']))
    if 'commands' not in fields:
        _fail(path, 'launcher.template must contain {{commands}} (where the job\'s commands go)')
    unknown = sorted(fields - set(TEMPLATE_FIELDS))
    if unknown:
        _fail(path, f'launcher.template uses unknown field(s) {", ".join("{{" + f + "}}" for f in unknown)}; '
                    f'known: {", ".join("{{" + f + "}}" for f in TEMPLATE_FIELDS)}')
    return launcher


CONTROL_STARTS = ('reference', 'control')


def _control(path, raw, backend, base) -> dict:
    """[control]: objective (only 'mle'), start, and train options for the control alone."""
    if not raw:
        return {}
    options = {k: v for k, v in raw.items() if k not in ('objective', 'start')}
    _known(path, options, f'{backend.name} control', backend.train_options + ('objective', 'start'))
    if raw.get('objective') != 'mle':
        _fail(path, f'control.objective must be "mle" (the matched control: the same run with upstream\'s MLE loss), '
                    f'got {raw.get("objective")!r}')
    start = raw.get('start', 'reference')
    if start not in CONTROL_STARTS:
        _fail(path, f'control.start must be "reference" (each round\'s control starts from that round\'s reference) or '
                    f'"control" (from the previous round\'s control), got {start!r}')
    for key in backend.file_options:
        if key in options:
            options[key] = _expand(path, options[key], base)
            _check_file(path, f'control.{key}', options[key])
    return dict(objective='mle', start=start, options=options)


def _check_file(path, where, value):
    if '://' not in value and not os.path.exists(value):
        _fail(path, f'{where} {value} does not exist')


def parse(raw: dict, path: str) -> RoundsConfig:
    """Validate a parsed TOML document; raise DDOPatchError with a one-line message on the first problem."""
    base = os.path.dirname(os.path.abspath(path))
    _known(path, raw, 'top-level', ('backend', 'rounds', 'pretrained', 'data', 'pretraining_images', 'upstream_root', 'run',
                                    'sweep', 'train', 'override', 'control', 'evaluate', 'reference_samples', 'stop', 'launcher'))
    try:
        backend = load_backend_class(raw.get('backend'))
    except DDOPatchError as err:
        _fail(path, str(err))
    rounds = raw.get('rounds')
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        _fail(path, f'rounds must be an integer >= 1, got {rounds!r}')
    for key in ('pretrained',) + backend.required:
        if key not in raw:
            _fail(path, f'{key} is required for backend {backend.name}')

    run = raw.get('run', {})
    _known(path, run, 'run', ('duration', 'eval_every'))
    for key in ('duration', 'eval_every'):
        if key not in run:
            _fail(path, f'run.{key} is required')
    duration, eval_every = _size(path, 'run.duration', run['duration']), _size(path, 'run.eval_every', run['eval_every'])
    if duration < 1 or eval_every < 1:
        _fail(path, 'run.duration and run.eval_every must be >= 1')

    sweep = raw.get('sweep', {})
    _known(path, sweep, 'sweep', ('alpha', 'beta', 'policy', 'rungs', 'keep', 'carry', 'count', 'seed'))
    alphas, betas = _grid(path, sweep, 'alpha', 0, False), _grid(path, sweep, 'beta', 0, True)
    policy = _sweep_policy(path, sweep, duration, eval_every)

    train = dict(raw.get('train', {}))
    _known(path, train, f'{backend.name} train', backend.train_options)
    overrides = []
    for i, entry in enumerate(raw.get('override', [])):
        entry = dict(entry)
        first = entry.pop('from_round', None)
        if not isinstance(first, int) or isinstance(first, bool) or not 1 <= first <= rounds:
            _fail(path, f'override #{i + 1} needs from_round, an integer in [1, rounds = {rounds}], got {first!r}')
        if not entry:
            _fail(path, f'override #{i + 1} (from_round = {first}) changes nothing')
        _known(path, entry, f'{backend.name} override', backend.train_options)
        overrides.append((first, entry))
    overrides.sort(key=lambda item: item[0])   # stable: entries for the same round keep file order
    for options in [train] + [values for _, values in overrides]:
        for key in backend.file_options:
            if key in options:
                options[key] = _expand(path, options[key], base)
                _check_file(path, f'train.{key}', options[key])
        for key in ('lr', 'P_std'):
            if key in options:
                _number(path, f'{key}', options[key], 0, open_min=True)

    control = _control(path, dict(raw.get('control', {})), backend, base)

    evaluate = dict(raw.get('evaluate', {}))
    racing = _racing(path, evaluate, backend)
    _known(path, evaluate, f'{backend.name} evaluate', backend.evaluate_options)
    if 'metric' not in evaluate:
        _fail(path, 'evaluate.metric is required (edm2: fid or fd_dinov2; var: MODULE:FUNCTION, lower is better)')
    for key in backend.evaluate_file_options:
        if key in evaluate:
            evaluate[key] = _expand(path, evaluate[key], base)
            _check_file(path, f'evaluate.{key}', evaluate[key])

    reference_samples = dict(raw.get('reference_samples', {}))
    if reference_samples and not backend.reference_sample_options:
        _fail(path, f'[reference_samples] is for backends that sample offline ({backend.name} samples its reference online)')
    _known(path, reference_samples, 'reference_samples', backend.reference_sample_options)

    stop = dict(raw.get('stop', {}))
    _known(path, stop, 'stop', ('min_improvement', 'patience'))
    stop = dict(min_improvement=_number(path, 'stop.min_improvement', stop.get('min_improvement', 0.0)),
                patience=stop.get('patience', 0))
    if not isinstance(stop['patience'], int) or isinstance(stop['patience'], bool) or stop['patience'] < 0:
        _fail(path, f'stop.patience must be an integer >= 0 (0 = run all rounds), got {stop["patience"]!r}')

    pretrained = _expand(path, raw['pretrained'], base)
    _check_file(path, 'pretrained', pretrained)
    data = _expand(path, raw['data'], base) if 'data' in raw else None
    if data is not None:
        _check_file(path, 'data', data)
    images = raw.get('pretraining_images')
    if images is not None:
        images = _size(path, 'pretraining_images', images)
    upstream_root = _expand(path, raw['upstream_root'], base) if 'upstream_root' in raw else None
    if upstream_root is not None:
        _check_file(path, 'upstream_root', upstream_root)
    cfg = RoundsConfig(source=os.path.abspath(path), backend=raw['backend'], rounds=rounds, pretrained=pretrained, data=data,
                       pretraining_images=images, duration=duration, eval_every=eval_every, alphas=alphas, betas=betas,
                       sweep=policy,
                       train=train, overrides=overrides, control=control, evaluate=evaluate, racing=racing,
                       reference_samples=reference_samples,
                       stop=stop, launcher=_launcher(path, raw.get('launcher', {})), upstream_root=upstream_root)
    backend_instance = cfg.make_backend()
    backend_instance.validate()
    if racing and racing['samples'][-1] >= backend_instance.evaluation_samples('select'):
        _fail(path, f'evaluate.race_samples must lie below the selection seeds\' count '
                    f'{backend_instance.evaluation_samples("select")}, got {racing["samples"]}')
    return cfg


def load(path) -> RoundsConfig:
    path = str(path)
    try:
        with open(path, 'rb') as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise DDOPatchError(f'config {path} not found') from None
    except tomllib.TOMLDecodeError as err:
        raise DDOPatchError(f'{path} is not valid TOML: {err}') from None
    return parse(copy.deepcopy(raw), path)
