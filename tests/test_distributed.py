"""Ending a process that joined a process group (ddo_patch.distributed), in subprocesses as entry points run."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import os, sys, torch
    from ddo_patch.distributed import join_from_env, run_entry_point

    def main():
        mode = sys.argv[1]
        if mode != 'no-group':
            os.environ.update(MASTER_ADDR='localhost', MASTER_PORT=sys.argv[2], RANK='0', WORLD_SIZE='1')
            join_from_env(torch.device('cpu'))
            ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))  # keeps the group alive in C++
            ddp(torch.ones(2, 3)).sum().backward()
        print('all files written', end='')  # unflushed: must still reach the pipe
        if mode == 'fails':
            sys.exit(3)

    run_entry_point(main)
    print('unreachable')
''')


@pytest.mark.parametrize('mode, code', [('group', 0), ('no-group', 0), ('fails', 3)])
def test_entry_point_ends_with_its_status_and_flushed_output(mode, code, free_port):
    proc = subprocess.run([sys.executable, '-c', SCRIPT, mode, free_port], capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == 'all files written'
    assert 'terminate called' not in proc.stderr
