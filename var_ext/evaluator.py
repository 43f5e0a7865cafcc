"""Class-balanced image generation and the injectable metric used to pick the best DDO checkpoint.

Seed s always gets class `s % num_classes` (`ddo_patch.seeds.balanced_labels`) and its own generator,
so an image depends on (weights, seed, cfg) only: the same evaluation set is drawn at every evaluation,
whatever the number of GPUs or the batch size, which keeps successive scores comparable.

A metric is any `module:function` called as `function(images, labels) -> float`, images uint8 NHWC
(numpy), labels int64; lower is better (FID-like). A metric with the attribute `takes_tokens = True` gets
the sampled token pyramids instead, int64 [N, L] with the scales concatenated coarse to fine (nothing is
decoded): for metrics in token space, such as exact likelihoods (`var_ext.exact.teacher_nll`). Each rank
generates its share of the seeds and writes it to a shard; rank 0 calls the metric on the union.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import numpy as np
import torch
import torch.distributed as tdist

from ddo_patch.distributed import barrier
from ddo_patch.seeds import balanced_labels
from var_ext import sampler


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> uint8 NHWC, rounded as PIL would save it."""
    return images.float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate_balanced(var, seeds, cfg: float = 0.0, top_k: int = 0, top_p: float = 0.0, batch: int = 64,
             amp_ctx=None, progress=None, decode: bool = True):
    """Yield (seeds, labels, uint8 NHWC images) for `seeds`, `batch` at a time; with decode=False the token
    pyramids, int64 [B, L], instead of the images."""
    device = next(var.parameters()).device
    was_training = var.training
    var.eval()
    try:
        for first in range(0, len(seeds), batch):
            chunk = [int(s) for s in seeds[first:first + batch]]
            labels = torch.as_tensor(balanced_labels(chunk, var.num_classes), device=device)
            with amp_ctx or contextlib.nullcontext():
                samples = sampler.sample(var, labels, cfg=cfg, top_k=top_k, top_p=top_p, seeds=chunk, decode=decode)
            if progress is not None:
                progress.update(len(chunk))
            yield chunk, labels.cpu().numpy(), to_uint8(samples.images) if decode else samples.sequence.cpu().numpy()
    finally:
        var.train(was_training)


class Evaluator:
    """Scores a VAR with `metric` on the class-balanced images (or token pyramids, for a metric that `takes_tokens`)
    of `seeds` at each guidance scale in `scales`."""

    def __init__(self, metric, seeds, scales, workdir, batch: int = 64, rank: int = 0, world_size: int = 1):
        self.metric, self.seeds, self.scales = metric, [int(s) for s in seeds], tuple(scales)
        self.workdir, self.batch, self.rank, self.world_size = workdir, batch, rank, world_size

    def __call__(self, var, amp_ctx=None) -> dict:
        """{'cfg=0': score, 'cfg=1.5': score, ...}, identical on every rank."""
        scores, decode = {}, not getattr(self.metric, 'takes_tokens', False)
        for cfg in self.scales:
            shard_dir = os.path.join(self.workdir, f'eval-cfg{cfg:g}')
            os.makedirs(shard_dir, exist_ok=True)
            parts = list(generate_balanced(var, self.seeds[self.rank::self.world_size], cfg=cfg, batch=self.batch, amp_ctx=amp_ctx,
                                           decode=decode))
            empty = np.zeros((0, 1, 1, 3), np.uint8) if decode else np.zeros((0, sum(pn * pn for pn in var.patch_nums)), np.int64)
            np.savez(os.path.join(shard_dir, f'rank{self.rank}.npz'),
                     seeds=np.array([s for p in parts for s in p[0]], dtype=np.int64),
                     labels=np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64),
                     samples=np.concatenate([p[2] for p in parts]) if parts else empty)
            barrier()
            score = [None]
            if self.rank == 0:
                shards = [np.load(os.path.join(shard_dir, f'rank{r}.npz')) for r in range(self.world_size)]
                order = np.argsort(np.concatenate([s['seeds'] for s in shards]))
                samples = np.concatenate([s['samples'] for s in shards])[order]
                labels = np.concatenate([s['labels'] for s in shards])[order]
                score = [float(self.metric(samples, labels))]
                shutil.rmtree(shard_dir)
            if self.world_size > 1:
                tdist.broadcast_object_list(score, src=0)
            scores[f'cfg={cfg:g}'] = score[0]
        return scores
