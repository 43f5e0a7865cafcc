"""Sampling seeds: how they are written on command lines, and the class each one samples."""

from __future__ import annotations

import numpy as np

from ddo_patch.errors import DDOPatchError


def parse_seeds(text: str) -> list:
    """Seeds as '0-49999' (inclusive range), '1,2,5-10', or a single number, in the given order."""
    seeds = []
    for part in str(text).split(','):
        bounds = part.strip().split('-')
        try:
            if len(bounds) == 1:
                seeds.append(int(bounds[0]))
                continue
            if len(bounds) == 2 and int(bounds[0]) <= int(bounds[1]):
                seeds.extend(range(int(bounds[0]), int(bounds[1]) + 1))
                continue
        except ValueError:
            pass
        raise DDOPatchError(f'bad seed list "{text}"; write e.g. 0-49999 or 1,2,5-10')
    return seeds


def balanced_labels(seeds, num_classes: int) -> np.ndarray:
    """Class of each sampling seed: `seed % num_classes`.

    Any contiguous seed range whose length is a multiple of num_classes is exactly class-balanced (the
    paper found balance crucial), and each seed's class depends on the seed alone, so generation can be
    split over GPUs and resumed in any order.
    """
    if num_classes < 1:
        raise DDOPatchError(f'num_classes must be >= 1, got {num_classes}')
    return np.asarray(seeds, dtype=np.int64) % num_classes


def check_disjoint(named_seed_lists: dict) -> None:
    """Raise naming the first two of {name: seeds} that share a seed (sampling noise must not be reused across roles)."""
    names = list(named_seed_lists)
    sets = {name: set(seeds) for name, seeds in named_seed_lists.items()}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = sets[a] & sets[b]
            if common:
                raise DDOPatchError(f'{a} and {b} share seed {min(common)} ({len(common)} in all); give them disjoint ranges')


def seed_range(first: int, count: int) -> str:
    """count seeds from first, written as parse_seeds reads them."""
    return f'{first}-{first + count - 1}'
