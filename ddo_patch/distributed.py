"""How a process that joined a torch.distributed group ends: together with the other ranks, and without
leaving the group to C++ destructors.

torch's DistributedDataParallel keeps a C++ reference to its process group that outlives the DDP module,
the network and `destroy_process_group()` (torch 2.13, gloo: the group's worker threads still run after
all three are gone). Such a group is torn down by C++ destructors during interpreter shutdown, where a
finished run can abort ("terminate called without an active exception", SIGABRT), and torchrun, SLURM
and the round manager then count a run that wrote all its files as failed. So an entry point that opens
a group ends through `run_entry_point`: after success all ranks meet at a barrier, the group is destroyed
while the interpreter is whole, output is flushed and the process exits at once, skipping that teardown.
Failures exit the ordinary way, with the group destroyed at exit (`join_process_group`).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Callable, NoReturn

import torch


def _destroy_group_if_any() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def join_process_group(backend: str) -> None:
    """Join the group torchrun's environment describes (env://); a run that fails destroys it at exit."""
    torch.distributed.init_process_group(backend=backend, init_method='env://')
    atexit.register(_destroy_group_if_any)


def end_process() -> NoReturn:
    """End this process after success; with a process group: all ranks together, then at once (see above)."""
    if not torch.distributed.is_initialized():
        sys.exit(0)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_entry_point(main: Callable[[], object]) -> NoReturn:
    """Run a command-line entry point (a click command exits through SystemExit) and end the process."""
    try:
        main()
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise
    end_process()
