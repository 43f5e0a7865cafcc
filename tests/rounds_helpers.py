"""Shared by the round-manager tests: writing configs, and fake SLURM commands on PATH."""

import json
import os
import stat
import textwrap

from click.testing import CliRunner

FAKE_SBATCH = textwrap.dedent('''\
    #!/bin/bash
    # Fake sbatch: remember the script, hand out increasing job ids, mark the job queued.
    dir="$FAKE_SLURM_DIR"
    id=$(( $(cat "$dir/next_id" 2>/dev/null || echo 100) + 1 ))
    echo $id > "$dir/next_id"
    echo "$id ${@: -1}" >> "$dir/submitted"
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
    # Fake squeue -h -j ID -o %i: print the id while it is listed in $FAKE_SLURM_DIR/queued.
    while [ $# -gt 0 ]; do [ "$1" = -j ] && id=$2; shift; done
    grep -qx "$id" "$FAKE_SLURM_DIR/queued" 2>/dev/null && echo "$id"
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


def comparable(obj):
    """The manifest minus what differs between two runs of the same work: wall times, and file hashes (torch
    pickles name tensor storages by memory address, so equal weights do not give equal bytes)."""
    if isinstance(obj, dict):
        return {k: comparable(v) for k, v in obj.items() if k not in ('wall_seconds', 'sha256')}
    if isinstance(obj, list):
        return [comparable(v) for v in obj]
    return obj


def cli_runner():
    """A click runner that keeps stderr apart (the default from click 8.2 on; an option before)."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()
