"""Leaving a training run when the cluster asks, having lost at most one step.

Slurm signals a job before it ends it (SIGTERM, then SIGKILL after KillWait; or, with `--signal`, a chosen
signal some minutes before the time limit or a preemption). A training entry point that holds a `StopRequest`
checks it at every step boundary; once any rank has received SIGUSR1 or SIGTERM, every rank agrees (in the same
step) to stop, the run writes its training-state checkpoint as it does at a checkpoint interval, and the
process exits with `EXIT_INTERRUPTED`: interrupted, resume me (rerun the same command).
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as tdist

from ddo_patch.errors import EXIT_INTERRUPTED

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Interrupted(Exception):
    """Raised by a training loop once its checkpoint is written; the entry point exits with EXIT_INTERRUPTED."""


class StopRequest:
    """Within the block, SIGUSR1 and SIGTERM set a flag (a second signal changes nothing: the save it would
    interrupt is atomic); `due()` tells every rank, at the same step, whether any rank has one. The previous
    handlers are back on exit."""

    def __init__(self, device):
        self.device = device
        self.received = None
        self._previous = {}

    def __enter__(self):
        self._previous = {signum: signal.signal(signum, self._receive) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _receive(self, signum, frame):
        # Only the flag: printing here could re-enter a write the loop is in the middle of.
        self.received = self.received or signal.Signals(signum).name

    def due(self) -> bool:
        """Called by every rank at every step boundary. Several ranks: one scalar all-reduce (max), so that a signal
        that reaches the ranks at different steps still stops them all after the same step."""
        flag = self.received is not None
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            agreed = torch.tensor([float(flag)], device=self.device)
            tdist.all_reduce(agreed, op=tdist.ReduceOp.MAX)
            flag = bool(agreed.item())
        if flag and self.received:
            print(f'[ddo-patch] {self.received} received: the step in progress is done; writing the training state, then '
                  f'exiting with status {EXIT_INTERRUPTED} (rerun the same command to resume)', flush=True)
        return flag
