"""The real data stream: upstream's ImageFolder pipeline by default, or any dataset named `module:function`.

A dataset item is `(x, label)` where `x` is either an image in [-1, 1], [3, H, W] (tokenised on the fly
through the VQVAE, as upstream trains) or an already tokenised pyramid, a LongTensor [L] with the scales
concatenated coarse to fine. `--dataset module:function` is called as `function(resolution)` and returns
such a dataset; the tests use it to feed a synthetic token distribution.

Upstream's `utils/data.build_dataset` needs torchvision (ImageFolder, Resize/Crop); it is imported only
when `--data` is used, so that everything else runs without it. A torchvision that is missing or does not
fit the installed torch (its import raises, e.g. `RuntimeError: operator torchvision::nms does not exist`)
stops the run with one line naming the fix.
"""

from __future__ import annotations

import importlib
import os

import torch

from ddo_patch.errors import DDOPatchError


def resolve(spec: str, what: str):
    """'package.module:function' -> the function."""
    module_name, _, attr = spec.partition(':')
    if not module_name or not attr:
        raise DDOPatchError(f'{what} must be given as module:function, got "{spec}"')
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise DDOPatchError(f'cannot load {what} "{spec}": {err}') from None


def build_dataset(data_path, dataset_spec, resolution: int):
    if dataset_spec:
        return resolve(dataset_spec, '--dataset')(resolution)
    if not data_path:
        raise DDOPatchError('give --data (an ImageFolder root with train/ and val/, as upstream) or --dataset module:function')
    try:
        import torchvision  # noqa: F401  (upstream's pipeline is built on it)
    except Exception as err:  # noqa: BLE001 (missing, or built for another torch: RuntimeError 'operator torchvision::nms ...')
        first_line = (str(err).strip().splitlines() or [''])[0]
        missing = isinstance(err, ModuleNotFoundError) and err.name == 'torchvision'
        problem = 'torchvision is not installed' if missing else f'importing torchvision fails ({type(err).__name__}: {first_line})'
        raise DDOPatchError(f'--data uses upstream\'s torchvision ImageFolder pipeline, but {problem}; install the torchvision '
                            f'built for your torch {torch.__version__}, or pass --dataset module:function') from None
    from utils import data as upstream_data
    _, train_set, _ = upstream_data.build_dataset(data_path, final_reso=resolution)
    return train_set


def default_workers(most: int = 4) -> int:
    """Data-loader processes per rank: up to `most`, leaving one of this rank's share of the CPUs to the training
    process (1 on a 2-core machine, 0 on one core), so that torch's DataLoader never warns that it starts more
    workers than the machine has CPUs. Upstream VAR's default, `--workers 0`, loads in the training process."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))   # torchrun's processes on this machine
    return max(0, min(most, cpus // local_ranks - 1))


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's share of global batch `it`, `it` = start, start + 1, ...

    The global index stream is a concatenation of permutations seeded by (seed, epoch), so batch `it` is a
    pure function of (seed, it): resuming at iteration k sees exactly the data an uninterrupted run would.
    """

    def __init__(self, dataset_len: int, global_batch: int, rank: int, world_size: int, seed: int = 0, start: int = 0):
        if dataset_len < 1:
            raise DDOPatchError('the dataset is empty')
        self.n, self.global_batch, self.seed, self.start = dataset_len, global_batch, seed, start
        self.local = global_batch // world_size
        self.offset = rank * self.local
        self._epoch, self._perm = -1, None

    def _index(self, position: int) -> int:
        epoch, within = divmod(position, self.n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).tolist()
        return self._perm[within]

    def __iter__(self):
        it = self.start
        while True:
            first = it * self.global_batch + self.offset
            yield [self._index(p) for p in range(first, first + self.local)]
            it += 1


def split_scales(tokens: torch.Tensor, patch_nums):
    """[B, L] -> one [B, pn * pn] tensor per scale."""
    lengths = [pn * pn for pn in patch_nums]
    if tokens.shape[1] != sum(lengths):
        raise DDOPatchError(f'token sequences have length {tokens.shape[1]}, but patch_nums {tuple(patch_nums)} need {sum(lengths)}')
    return list(tokens.split(lengths, dim=1))
