"""Shared by the round-manager tests: writing configs, running the manager, and fake SLURM commands on PATH."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, 'configs', 'tiny-cpu-edm2.toml')

FAKE_SBATCH = textwrap.dedent('''\
    #!/bin/bash
    # Fake sbatch: remember the script, hand out increasing job ids, mark the job queued.
    dir="$FAKE_SLURM_DIR"
    id=$(( $(cat "$dir/next_id" 2>/dev/null || echo 100) + 1 ))
    echo $id > "$dir/next_id"
    echo "$id ${@: -1}" >> "$dir/submitted"
    echo "$id $*" >> "$dir/options"
    echo $id >> "$dir/queued"
    echo "$id;fakecluster"
''')

# The same, but the job runs to its end inside sbatch (it is never seen queued), with the fake srun and scontrol
# below: for tests of what the manager does with jobs on the SLURM path (the real daemons: tests/test_rounds_slurm.py).
FAKE_SBATCH_RUNS = FAKE_SBATCH.replace('echo $id >> "$dir/queued"', 'SLURM_JOB_ID=$id bash "${@: -1}" > /dev/null 2>&1')

FAKE_SRUN = textwrap.dedent('''\
    #!/bin/bash
    # Fake srun for one process: drop srun's options, then torch.distributed.run and its options, run the module.
    while [[ $1 == --* ]]; do shift; done
    python=$1; shift
    if [ "$1 $2" = "-m torch.distributed.run" ]; then shift 2; while [ "$1" != -m ]; do shift; done; fi
    exec "$python" "$@"
''')

FAKE_SCONTROL = '#!/bin/bash\necho localhost\n'

FAKE_SQUEUE = textwrap.dedent('''\
    #!/bin/bash
    # Fake squeue -h -t all -j ID,ID -o '%i %T': each id listed in $FAKE_SLURM_DIR/queued, as PENDING.
    while [ $# -gt 0 ]; do [ "$1" = -j ] && ids=$2; shift; done
    for id in ${ids//,/ }; do grep -qx "$id" "$FAKE_SLURM_DIR/queued" 2>/dev/null && echo "$id PENDING"; done
    exit 0
''')


def install_fake_slurm(tmp_path, monkeypatch, run_jobs=False):
    """Put fake sbatch/squeue first on PATH; returns the directory where they keep their state. run_jobs: sbatch runs
    the job script itself, to its end."""
    bin_dir, state = tmp_path / 'fake-bin', tmp_path / 'fake-slurm'
    bin_dir.mkdir()
    state.mkdir()
    tools = [('sbatch', FAKE_SBATCH_RUNS if run_jobs else FAKE_SBATCH), ('squeue', FAKE_SQUEUE)]
    for name, text in tools + ([('srun', FAKE_SRUN), ('scontrol', FAKE_SCONTROL)] if run_jobs else []):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
    monkeypatch.setenv('FAKE_SLURM_DIR', str(state))
    return state


def toml_value(value):
    return json.dumps(value)   # numbers, strings and lists of them are spelled alike in TOML and JSON


def write_config(path, top, tables, arrays=()):
    """A TOML file from {key: value} at the top, {table: {key: value}}, and [(array_table, {key: value})]."""
    lines = [f'{k} = {toml_value(v)}' for k, v in top.items()]
    for name, values in tables.items():
        lines.append(f'[{name}]')
        for k, v in values.items():
            if isinstance(v, dict):
                v = '{ ' + ', '.join(f'{kk} = {toml_value(vv)}' for kk, vv in v.items()) + ' }'
                lines.append(f'{k} = {v}')
            else:
                lines.append(f'{k} = {toml_value(v)}')
    for name, values in arrays:
        lines.append(f'[[{name}]]')
        lines += [f'{k} = {toml_value(v)}' for k, v in values.items()]
    path.write_text('\n'.join(lines) + '\n')
    return str(path)


def read_manifest(workdir):
    with open(os.path.join(workdir, 'manifest.json')) as f:
        return json.load(f)


def comparable(obj, ignore=()):
    """The manifest minus what differs between two runs of the same work: wall times (and a round's `times`), how often a job was interrupted,
    and file hashes (torch pickles name tensor storages by memory address, so equal weights do not give equal bytes);
    and the keys in `ignore`."""
    if isinstance(obj, dict):
        return {k: comparable(v, ignore) for k, v in obj.items() if k not in ('wall_seconds', 'times', 'interruptions', 'sha256', *ignore)}
    if isinstance(obj, list):
        return [comparable(v, ignore) for v in obj]
    return obj


def cli_runner():
    """A click runner that keeps stderr apart (the default from click 8.2 on; an option before)."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def manager(world, config, workdir, *command):
    return [sys.executable, '-m', 'ddo_patch.cli', 'rounds', *(command or ('run',)), *([config] if config else []),
            *(['--workdir'] if config else []), str(workdir)]


def run_manager(world, config, workdir, check=True):
    proc = subprocess.run(manager(world, config, workdir), env=world['env'], capture_output=True, text=True, timeout=600,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f'rounds run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def variant(world, name, **replacements):
    """The shipped tiny config with some lines replaced."""
    with open(TINY_CONFIG) as f:
        text = f.read()
    for old, new in replacements.items():
        assert old in text
        text = text.replace(old, new)
    path = world['root'] / name
    path.write_text(text)
    return str(path)


def halving_config(tmp_path, rounds=1, carry=False, seconds=0.0, launcher=None, evaluate=None):
    """Four points a1..a4 on the scripted law 'alpha_helps' (larger alpha, lower score at every step), 8 steps with
    an evaluation every 2, rungs at 2 and 4, half kept at each: a1, a2 stop at 2; a3 at 4; a4 runs to the end.
    `evaluate`: more [evaluate] options (racing)."""
    (tmp_path / 'pretrained.json').write_text('{"score": 10.0}')
    tests = os.path.dirname(os.path.abspath(__file__))   # where scripted_backend is
    sweep = dict(alpha=[1, 2, 3, 4], beta=[0.1, 0.2] if carry else [0.1], policy='halving', rungs=[2, 4], keep=0.5, carry=carry)
    return write_config(tmp_path / 'halving.toml', dict(backend='scripted_backend.ScriptedBackend', rounds=rounds,
                                                        pretrained='pretrained.json'),
                        dict(run=dict(duration=8, eval_every=2), sweep=sweep, train=dict(law='alpha_helps', seconds=seconds),
                             evaluate=dict(metric='score', **(evaluate or {})),
                             launcher=launcher or dict(kind='local', env={'PYTHONPATH': tests})))


def check_halving_round(workdir, r):
    runs = {run['name']: run for run in r['runs']}
    assert [(d['step'], d['kept'], d['stopped']) for d in r['rungs']] == [
        (2, ['a3_b0.1', 'a4_b0.1'], ['a1_b0.1', 'a2_b0.1']), (4, ['a4_b0.1'], ['a3_b0.1'])]
    assert {name: (run['status'], run.get('stopped_at')) for name, run in runs.items()} == {
        'a1_b0.1': ('stopped', 2), 'a2_b0.1': ('stopped', 2), 'a3_b0.1': ('stopped', 4), 'a4_b0.1': ('done', None)}
    # A stopped point keeps its evaluations (and its files) but gets no further job.
    assert [[e['step'] for e in runs[n]['evaluations']] for n in sorted(runs)] == [[2], [2], [2, 4], [2, 4, 6, 8]]
    assert [runs[n]['images'] for n in sorted(runs)] == [2, 2, 4, 8]
    assert not (workdir / 'round01' / 'a1_b0.1.to4.sh').exists() and not (workdir / 'round01' / 'a3_b0.1.sh').exists()
    assert (r['chosen']['run'], r['chosen']['step'], r['chosen']['score']) == ('a4_b0.1', 8, pytest.approx(10 - 0.4 * 8))
    # Cost: 16 images at 2.5, and 10 samples (the scripted evaluation) at 1 for 8 evaluations and the reference's.
    # Per stage: the reference's evaluation; 4 points x 2 steps and an evaluation each; 2 x 2 and 2; a4's last 4 and 2.
    assert r['cost'] == dict(train_images=16, evaluation_samples=90, reference_samples=0,
                             mle_equivalents=pytest.approx(16 * 2.5 + 90),
                             stages={'reference': 10, 'rung 2': 20 + 40, 'rung 4': 10 + 20, 'end': 10 + 20, 'report': 0})
    assert [(t['stage'], t['jobs']) for t in r['times']] == [('reference', 1), ('rung 2', 4), ('rung 4', 2), ('end', 1)]
