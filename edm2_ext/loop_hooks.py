"""What edm2_ext adds between two steps of upstream's training loop, which runs unchanged: leaving on a signal with
the training state written, and counting the steps whose gradients were not finite.

Import after `ddo_patch.upstream.activate('edm2')`. Upstream checks for a stop request only at status intervals
(and its `dist.should_stop()` always says no), and replaces NaN/Inf gradients by zeros (`force_finite`) without a
word. The hooks sit where upstream touches every step anyway, swapped in for the duration of the loop only:

- `misc.set_random_seed(seed, rank, cur_nimg)`, called at the start of every step once the previous one is complete
  (optimiser and EMA updated, status, snapshot and checkpoint written): the step boundary. There every rank agrees
  (`StopRequest.due`) whether to leave; if so, the loop's own `CheckpointIO` (recorded as the loop builds it)
  writes the training state, atomically, and the process exits with status 75.
- `torch.nan_to_num(param.grad, ..., out=param.grad)`, upstream's zeroing of each gradient: whether any was not
  finite before it is kept on the device (no synchronisation per parameter) and read once per step.
- `training_stats.default_collector.update`, called by the status report: the last step of the interval is counted
  before the row is written.

A state written on a signal is named by its kimg like upstream's, one kimg lower when that would be the name of the
run's final state (the round manager's sign that training is done). The gradients are all-reduced before
upstream zeroes them, so every rank counts the same steps.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ddo_patch.distributed import barrier
from ddo_patch.errors import DDOPatchError
from ddo_patch.preemption import Interrupted
from ddo_patch.scoped import swapped
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats


class StepHooks:
    def __init__(self, run_dir, stop, total_nimg, steps_per_status, max_nonfinite, device):
        self.run_dir, self.stop, self.total_nimg = run_dir, stop, total_nimg
        self.steps_per_status, self.max_nonfinite = steps_per_status, max_nonfinite
        self.checkpoint = self.state = None   # the loop's CheckpointIO and its `state` (cur_nimg), once built
        self.nonfinite = torch.zeros([], dtype=torch.bool, device=device)   # in the step now running
        self.step_pending = False    # a step ran and is not counted yet
        self.consecutive = 0

    @contextlib.contextmanager
    def installed(self):
        upstream_checkpoint_io, seed, nan_to_num = dist.CheckpointIO, misc.set_random_seed, torch.nan_to_num
        update = training_stats.default_collector.update

        def checkpoint_io(**state_objs):
            self.checkpoint = upstream_checkpoint_io(**state_objs)
            self.state = state_objs['state']
            return self.checkpoint

        def counted_nan_to_num(input, *args, out=None, **kwargs):
            if out is input:   # upstream's in-place zeroing of a gradient
                self.nonfinite |= ~torch.isfinite(input).all()
            return nan_to_num(input, *args, out=out, **kwargs)

        def step_boundary(*args):
            seed(*args)
            if len(args) == 3:   # (seed, rank, cur_nimg): a step starts; the init call passes no cur_nimg
                self.count_previous_step()
                self.leave_if_asked(args[2])
                self.step_pending = True

        def status_update(*args, **kwargs):
            self.count_previous_step()
            return update(*args, **kwargs)

        with contextlib.ExitStack() as stack:
            stack.enter_context(swapped(dist, 'CheckpointIO', checkpoint_io))
            stack.enter_context(swapped(misc, 'set_random_seed', step_boundary))
            stack.enter_context(swapped(torch, 'nan_to_num', counted_nan_to_num))
            stack.enter_context(swapped(training_stats.default_collector, 'update', status_update))
            yield self

    def count_previous_step(self):
        if not self.step_pending:
            return
        self.step_pending = False
        nonfinite = bool(self.nonfinite.item())
        self.nonfinite.zero_()
        # upstream writes each statistic's mean over the status interval: this many per step makes it the count
        training_stats.report('Faults/nonfinite_steps', float(nonfinite) * self.steps_per_status)
        self.consecutive = self.consecutive + 1 if nonfinite else 0
        if self.consecutive > self.max_nonfinite:
            raise DDOPatchError(f'{self.consecutive} consecutive steps had non-finite gradients (upstream zeroed them; the last '
                                f'ended at {self.state.cur_nimg / 1000:g} kimg); the run diverged: lower --lr (or raise --max-nonfinite)')

    def leave_if_asked(self, cur_nimg):
        if not self.stop.due():
            return
        kimg = cur_nimg // 1000
        if kimg == self.total_nimg // 1000:
            kimg -= 1
        if kimg >= 0:   # (a run shorter than 1000 images has no name left: it restarts)
            path = os.path.join(self.run_dir, f'training-state-{kimg:07d}.pt')
            self.checkpoint.save(path + '.tmp')
            if dist.get_rank() == 0:
                os.replace(path + '.tmp', path)
        barrier()
        raise Interrupted(cur_nimg)
