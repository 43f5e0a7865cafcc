"""Joining the process group that torchrun (or SLURM + torch.distributed.run) describes, for every entry point
of both adapters, and ending such a process: together with the other ranks, and without leaving the group
to C++ destructors.

`join_from_env` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; a single
process without torchrun gets a group of one on a free local port: upstream EDM2 builds DDP even alone),
puts the rank on its GPU and joins with NCCL on CUDA, gloo on the CPU.

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
import socket
import sys
from typing import Callable, NoReturn

import torch


def _destroy_group_if_any() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device_for_this_rank() -> torch.device:
    """The rank's GPU (LOCAL_RANK under torchrun) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
    return torch.device('cpu')


def join_from_env(device: torch.device) -> tuple:
    """Join the group of the environment (idempotent); (rank, world size). A run that fails destroys it at exit.

    Without torchrun's variables the process joins a group of one on a free local port, leaving os.environ as it
    is (a test or notebook that calls an entry point in-process must not pass a used port on to its subprocesses).
    """
    if not torch.distributed.is_initialized():
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        if 'WORLD_SIZE' in os.environ:
            torch.distributed.init_process_group(backend=backend, init_method='env://')
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(('127.0.0.1', 0))
                port = s.getsockname()[1]
            torch.distributed.init_process_group(backend=backend, init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
        atexit.register(_destroy_group_if_any)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


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
