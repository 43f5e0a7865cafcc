"""An exact-likelihood world for VAR: a sharpened teacher VAR is the data distribution (benchmarks/var_exact.py).

A token pyramid x has an exact log-likelihood under any VAR (Eq. 1: the sum of its teacher-forced token
log-probabilities), and so does the distribution that the sampler draws from at a guidance scale w: within a
scale the tokens are drawn independently from softmax((1 + t) l_cond - t l_uncond), t = w * si / (n - 1)
(`var_ext.sampler`), so

    log q_w(x) = sum_si sum_{l in scale si} log softmax((1 + t_si) l_cond - t_si l_uncond)[x_l].

Here p_data is a teacher: an upstream VAR with its residual branches switched on (upstream initialises the
adaLN gates at 1e-5, which leaves a random VAR nearly context-free and easy to imitate), a strong class
embedding, and its head scaled by `sharpness`, so that its conditionals are peaked but not deterministic.
Its exact samples are the training set and a disjoint held-out set; a smaller student trained on them by
MLE cannot represent it. The metrics, per sample, so that their standard errors are std / sqrt(n):

- precision-like: log p_teacher(x), x ~ q_w (the model's samples at scale w);
- recall-like: -log q_w(x), x ~ p_teacher (held-out teacher samples);
- coverage: the entropy -log q_w(x), x ~ q_w (a collapsing model loses it; the teacher's is its own).

`teacher_nll` is the trainer's `--metric` in this world: it takes token pyramids, not images (`takes_tokens`).
The world's directory is `$DDO_VAR_EXACT` (set by the benchmark for its subprocesses).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import torch

from ddo_patch import losses
from ddo_patch.errors import DDOPatchError
from var_ext import models, sampler
from var_ext.datasets import split_scales

ENV = 'DDO_VAR_EXACT'
WORLD, TEACHER, VAE, TRAIN, HELDOUT = 'world.json', 'teacher.pth', 'vae.pth', 'train.pt', 'heldout.pt'
TRAIN_SEEDS, HELDOUT_SEEDS = 1_000_000, 2_000_000   # the teacher's sampling seeds of the two sets (first of each)


@dataclasses.dataclass(frozen=True)
class World:
    """The shapes and the teacher's construction; `student` is what MLE trains (it has less capacity)."""
    teacher_depth: int = 3
    student_depth: int = 1
    patch_nums: tuple = (1, 2, 3, 4)
    num_classes: int = 100         # many classes, 200 training pyramids each: the student under-fits them, CFG helps
    vocab: int = 64
    sharpness: float = 4.0         # std of the teacher's logits (its head reads layer-normed features)
    class_strength: float = 0.5    # std of the class embedding (upstream's: 0.04): strongly class-dependent
    train_size: int = 20000
    heldout_size: int = 4000
    seed: int = 0

    def config(self, depth: int) -> models.VARConfig:
        return models.VARConfig(depth=depth, patch_nums=self.patch_nums, num_classes=self.num_classes,
                                vae_vocab=self.vocab, vae_z_channels=8, vae_ch=32)


@torch.no_grad()
def switch_on_blocks(var) -> None:
    """Open the residual gates of every block: upstream initialises the adaLN gains gamma1, gamma2 at ~1e-5, so a
    freshly built VAR's attention and MLP contribute almost nothing until training has grown them."""
    for block in var.blocks:   # adaLN output [gamma1, gamma2, scale1, scale2, shift1, shift2]
        block.ada_lin[-1].bias[:2 * var.C] = 1.0
        block.ada_lin[-1].weight[:2 * var.C].normal_(0, var.C ** -0.5)


def build_teacher(world: World):
    """(vqvae, teacher): upstream's VAR with its blocks switched on, a strong class embedding, a sharpened head."""
    torch.manual_seed(world.seed)
    vae, teacher = models.build(world.config(world.teacher_depth), 'cpu')
    for module in vae.modules():   # upstream leaves the VQVAE uninitialised; its codebook embeds the tokens
        if module is not vae and hasattr(module, 'reset_parameters'):
            module.reset_parameters()
    switch_on_blocks(teacher)
    with torch.no_grad():
        teacher.class_emb.weight.normal_(0, world.class_strength)
        teacher.head.weight.normal_(0, world.sharpness / teacher.C ** 0.5)   # logits of std ~ sharpness
        teacher.head.bias.zero_()
    return vae, teacher.eval().requires_grad_(False)


def guided_log_likelihood(var, labels: torch.Tensor, tokens: torch.Tensor, cfg: float = 0.0) -> torch.Tensor:
    """log q_cfg(tokens) [B] in fp32: the exact log-probability that `sampler.sample(var, labels, cfg)` draws the
    pyramids `tokens` [B, L] (cfg = 0: the model's own likelihood, Eq. 1)."""
    quantize = var.vae_quant_proxy[0]
    inputs = quantize.idxBl_to_var_input(split_scales(tokens, var.patch_nums))
    logits = var(labels, inputs).float()
    if cfg != 0:
        uncond = var(torch.full_like(labels, var.num_classes), inputs).float()
        ramp = torch.cat([torch.full((pn * pn,), sampler.guidance_weight(cfg, si, len(var.patch_nums)))
                          for si, pn in enumerate(var.patch_nums)]).to(logits.device)[None, :, None]
        logits = (1 + ramp) * logits - ramp * uncond
    return losses.sequence_log_likelihood(logits, tokens)


@torch.no_grad()
def log_likelihoods(var, labels, tokens, cfg: float = 0.0, batch: int = 500) -> torch.Tensor:
    was_training = var.training
    var.eval()
    try:
        return torch.cat([guided_log_likelihood(var, labels[i:i + batch], tokens[i:i + batch], cfg)
                          for i in range(0, len(labels), batch)])
    finally:
        var.train(was_training)


@torch.no_grad()
def draw(var, labels: torch.Tensor, seeds, cfg: float = 0.0, batch: int = 500) -> torch.Tensor:
    """Pyramids [N, L] of `var` at scale cfg, one per (label, seed); no top-k/top-p."""
    var.eval()
    return torch.cat([sampler.sample(var, labels[i:i + batch], cfg=cfg, seeds=seeds[i:i + batch]).sequence
                      for i in range(0, len(labels), batch)])


def make_world(path: str, world: World) -> None:
    """Write the world to `path` unless it is there: world.json, vae.pth and teacher.pth (plain state dicts),
    train.pt and heldout.pt ({'tokens': [N, L], 'labels': [N]}, class-balanced exact teacher samples)."""
    if os.path.isfile(os.path.join(path, WORLD)):
        if load_world(path)[0] != world:
            raise DDOPatchError(f'{path} holds another world; use a new --outdir')
        return
    os.makedirs(path, exist_ok=True)
    vae, teacher = build_teacher(world)
    for name, size, first in ((TRAIN, world.train_size, TRAIN_SEEDS), (HELDOUT, world.heldout_size, HELDOUT_SEEDS)):
        labels = torch.arange(size) % world.num_classes
        torch.save({'tokens': draw(teacher, labels, list(range(first, first + size))), 'labels': labels}, os.path.join(path, name))
    torch.save(vae.state_dict(), os.path.join(path, VAE))
    torch.save(teacher.state_dict(), os.path.join(path, TEACHER))
    with open(os.path.join(path, WORLD), 'w') as f:   # last: its presence means the world is complete
        json.dump(dataclasses.asdict(world), f, indent=1)


def directory() -> str:
    path = os.environ.get(ENV)
    if not path or not os.path.isfile(os.path.join(path, WORLD)):
        raise DDOPatchError(f'${ENV} must name a world directory written by benchmarks/var_exact.py, got {path!r}')
    return path


@functools.lru_cache(maxsize=None)
def load_world(path: str):
    """(world, vqvae, teacher) of a world directory."""
    with open(os.path.join(path, WORLD)) as f:
        world = World(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.load(f).items()})
    vae, teacher = models.build(world.config(world.teacher_depth), 'cpu')
    vae.load_state_dict(torch.load(os.path.join(path, VAE), map_location='cpu'), strict=True)
    teacher.load_state_dict(torch.load(os.path.join(path, TEACHER), map_location='cpu'), strict=True)
    return world, vae, teacher.eval().requires_grad_(False)


def load_set(path: str, name: str):
    data = torch.load(os.path.join(path, name))
    return data['labels'], data['tokens']


def load_model(path: str, checkpoint: str, depth: int):
    """A VAR of the world's shapes at `depth` with its VQVAE, from a plain state dict (an MLE or a var_ext.train checkpoint)."""
    world = load_world(path)[0]
    vae, var = models.build(world.config(depth), 'cpu')
    vae.load_state_dict(torch.load(os.path.join(path, VAE), map_location='cpu'), strict=True)
    var.load_state_dict(torch.load(checkpoint, map_location='cpu'), strict=True)
    return var.eval().requires_grad_(False)


def training_set(resolution):
    """`--dataset var_ext.exact:training_set`: the teacher's training pyramids (LongTensor [L], label)."""
    labels, tokens = load_set(directory(), TRAIN)
    return torch.utils.data.TensorDataset(tokens, labels)


def teacher_nll(tokens, labels) -> float:
    """`--metric var_ext.exact:teacher_nll`: -mean log p_teacher of the pyramids (lower is better)."""
    _, _, teacher = load_world(directory())
    return -float(log_likelihoods(teacher, torch.as_tensor(labels), torch.as_tensor(tokens)).mean())


teacher_nll.takes_tokens = True


def mle_loss(var, labels, tokens, generator, label_drop: float = 0.1) -> torch.Tensor:
    """Mean token cross-entropy of teacher-forced `var` with VAR's pretraining label dropout (class num_classes)."""
    dropped = torch.rand(labels.shape, generator=generator) < label_drop
    cond = torch.where(dropped, var.num_classes, labels)
    inputs = var.vae_quant_proxy[0].idxBl_to_var_input(split_scales(tokens, var.patch_nums))
    return torch.nn.functional.cross_entropy(var(cond, inputs).flatten(0, 1), tokens.flatten())


def train_mle(var, optimizer, labels, tokens, first: int, last: int, batch: int, seed: int = 0, every: int = 0, on_step=None,
              set_lr=None):
    """MLE steps first..last-1 on the set (labels, tokens): batch b of step s drawn with replacement by a generator
    seeded with (seed, s), so that a run resumed at any step draws what an uninterrupted one would. Calls
    `set_lr(s)` before step s (a learning-rate schedule) and `on_step(s + 1)` every `every` steps and after the last
    one (checkpoints, curve points)."""
    var.train()
    for step in range(first, last):
        if set_lr is not None:
            set_lr(step)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        index = torch.randint(len(labels), (batch,), generator=generator)
        loss = mle_loss(var, labels[index], tokens[index], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None and ((every and (step + 1) % every == 0) or step + 1 == last):
            on_step(step + 1)
    var.eval()
