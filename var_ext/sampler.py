"""KV-cached next-scale sampling for an upstream VAR that skips the unconditional half when unguided.

Upstream `VAR.autoregressive_infer_cfg` always runs the batch twice (conditional rows, then rows with the
"no class" label) and mixes the logits as `(1 + t) * cond - t * uncond` with a guidance weight that ramps
over the scales, `t = cfg * si / (num_scales - 1)`. Two consequences:

- `cfg=0` there is guidance-free but pays for the unconditional half anyway; `sample()` below with
  `cfg=0` runs the conditional rows only, about half the work, and is what DDO's reference uses (w = 0,
  section 5.3 / appendix C);
- at the pinned commit `cfg=1.0` is a *guided* sampler (t ramps from 0 to 1). NVlabs/DDO's README calls
  its `--cfg 1.0` guidance-free; in ddo-patch guidance-free is always `cfg=0`.

With `cfg != 0` the logits are upstream's, formula and batch layout included. Tokens are drawn from the
same distribution as upstream's (inverse-CDF instead of `torch.multinomial`, so not the same draws for a
given generator state), returned per scale as upstream's training code consumes them
(`quantize.idxBl_to_var_input`), and decoded to images only on request.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch

from ddo_patch.errors import DDOPatchError


@dataclasses.dataclass
class Samples:
    tokens: List[torch.Tensor]              # one LongTensor [B, pn * pn] per scale, coarse to fine
    images: Optional[torch.Tensor] = None   # [B, 3, H, W] in [0, 1] when decode=True

    @property
    def sequence(self) -> torch.Tensor:
        """All scales concatenated, [B, L]: the token order of VAR's teacher-forced logits."""
        return torch.cat(self.tokens, dim=1)


def guidance_weight(cfg: float, scale_index: int, num_scales: int) -> float:
    """Upstream's linear CFG ramp over scales, t = cfg * si / (n - 1) (models/var.py at the pin)."""
    return cfg * scale_index / max(num_scales - 1, 1)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest top-p nucleus to -inf (upstream's semantics:
    the nucleus keeps the highest-probability tokens whose cumulative mass reaches top_p). No-op at 0/0."""
    if top_k > 0:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, -torch.inf)
    if top_p > 0:
        ascending, order = logits.sort(dim=-1)
        drop_sorted = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop_sorted[..., -1] = False                 # always keep the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -torch.inf)
    return logits


def _draw(logits: torch.Tensor, generators) -> torch.Tensor:
    """One token per position from softmax(logits) [B, l, V] -> [B, l], by inverse-CDF sampling.

    One uniform per position, located in the cumulative distribution: the same distribution as upstream's
    `torch.multinomial`, at a fraction of its CPU cost (multinomial was a quarter of a guidance-free
    sampling pass on CPU). Tokens with probability 0 (top-k/top-p) are never drawn (`right=True` skips
    empty intervals). `generators` is None/one torch.Generator for the batch, or one generator per sample,
    which makes each sample depend on its own seed only (not on batch composition, rank or resumption).
    """
    batch, length, vocab = logits.shape
    cdf = logits.float().softmax(-1).cumsum(-1)
    if generators is None or isinstance(generators, torch.Generator):
        u = torch.rand(batch, length, 1, generator=generators, device=logits.device)
    else:
        u = torch.stack([torch.rand(length, 1, generator=g, device=logits.device) for g in generators])
    return torch.searchsorted(cdf, u * cdf[..., -1:], right=True).squeeze(-1).clamp_(max=vocab - 1)


def per_sample_generators(seeds: Sequence[int], device) -> List[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample(var, labels: torch.Tensor, cfg: float = 0.0, top_k: int = 0, top_p: float = 0.0,
           generator: Optional[torch.Generator] = None, seeds: Optional[Sequence[int]] = None,
           decode: bool = False) -> Samples:
    """Draw one token pyramid per label from an upstream VAR (`var` unwrapped from DDP/compile).

    labels: LongTensor [B] in [0, num_classes]; num_classes is VAR's unconditional class.
    cfg: 0 = guidance-free (conditional rows only); otherwise upstream's ramped CFG on 2B rows.
    generator / seeds: one generator for the batch, or one integer seed per sample (not both).
    Runs in whatever autocast context the caller sets, like upstream.
    """
    if seeds is not None and generator is not None:
        raise DDOPatchError('give either one generator for the batch or per-sample seeds, not both')
    if labels.ndim != 1 or labels.numel() == 0:
        raise DDOPatchError(f'labels must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}')
    if bool((labels < 0).any()) or bool((labels > var.num_classes).any()):
        raise DDOPatchError(f'labels must lie in [0, {var.num_classes}] ({var.num_classes} = unconditional), '
                            f'got {labels.min().item()}..{labels.max().item()}')
    if seeds is not None:
        if len(seeds) != labels.numel():
            raise DDOPatchError(f'need one seed per label, got {len(seeds)} seeds for {labels.numel()} labels')
        generator = per_sample_generators(seeds, labels.device)

    batch, num_scales = labels.shape[0], len(var.patch_nums)
    guided = cfg != 0
    rows = torch.cat([labels, torch.full_like(labels, var.num_classes)]) if guided else labels
    quant = var.vae_quant_proxy[0]
    finest = var.patch_nums[-1]

    cond = var.class_emb(rows)
    level_pos = var.lvl_embed(var.lvl_1L) + var.pos_1LC
    x = cond.unsqueeze(1).expand(-1, var.first_l, -1) + var.pos_start + level_pos[:, :var.first_l]
    f_hat = cond.new_zeros(batch, var.Cvae, finest, finest)
    tokens, end = [], 0
    for block in var.blocks:
        block.attn.kv_caching(True)
    try:
        for si, pn in enumerate(var.patch_nums):
            end += pn * pn
            cond_or_gss = var.shared_ada_lin(cond)
            for block in var.blocks:
                x = block(x=x, cond_BD=cond_or_gss, attn_bias=None)
            logits = var.get_logits(x, cond)
            if guided:
                t = guidance_weight(cfg, si, num_scales)
                logits = (1 + t) * logits[:batch] - t * logits[batch:]
            idx = _draw(filter_top_k_top_p(logits, top_k, top_p), generator)
            tokens.append(idx)
            h = quant.embedding(idx).transpose(1, 2).reshape(batch, var.Cvae, pn, pn)
            f_hat, x = quant.get_next_autoregressive_input(si, num_scales, f_hat, h)
            if si + 1 < num_scales:
                x = x.view(batch, var.Cvae, -1).transpose(1, 2)
                x = var.word_embed(x) + level_pos[:, end:end + var.patch_nums[si + 1] ** 2]
                if guided:
                    x = x.repeat(2, 1, 1)
    finally:
        for block in var.blocks:
            block.attn.kv_caching(False)
    images = var.vae_proxy[0].fhat_to_img(f_hat).add(1).mul(0.5) if decode else None
    return Samples(tokens, images)
