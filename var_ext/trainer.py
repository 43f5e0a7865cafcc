"""One DDO step for VAR (section 5.3, appendix C), owned by a trainer built on upstream's `VARTrainer`.

Upstream's `VARTrainer` keeps what it always keeps (the model, its DDP wrapper, the VQVAE, the
`AmpOptimizer` with its autocast context, grad clipping and loss scaling); `DDOTrainer` adds the frozen
reference and replaces the maximum-likelihood step by:

1. real images -> multi-scale token indices through the VQVAE (`img_to_idxBl`, as upstream);
2. the reference samples an equal-size fake batch online with the batch's own labels, guidance-free
   (w = 0), without top-k/top-p; the sampled indices are kept (no decode / re-encode round trip);
3. one label-dropout mask (50 %) per step, applied to both batches and shared by target and reference:
   dropped labels become class `num_classes`, VAR's unconditional embedding;
4. one teacher-forced forward of the target over cat(real, fake) (DDP wants one forward per backward),
   the same for the reference under no_grad; sequence log-likelihoods over every token of the pyramid in
   fp32 (Eq. 1);
5. the DDO loss (Eq. 13) per pair with alpha = 0 where the label was dropped, averaged over the batch;
6. `AmpOptimizer.backward_clip_step`.

At theta = theta_ref every delta is 0, so the loss is log 2 * (1 + alpha * fraction of kept labels).

With objective 'mle' (the matched control, `--objective mle`) the same trainer takes upstream's own step
instead: no reference samples, the real batch's token cross-entropy (`VARTrainer.train_loss`, weighted by
its `loss_weight`, 1/L per token) with the labels dropped at the label-dropout rate (VAR's `cond_drop_rate`,
drawn here from the step's generator); optimiser, schedule, batches and checkpoints are the DDO run's.
"""

from __future__ import annotations

import math
import time

import torch

from ddo_patch.errors import DDOPatchError
from ddo_patch.losses import (
    OBJECTIVES,
    autoregressive_ddo_terms,
    check_hyperparameters,
    label_dropout_alpha,
    sequence_log_likelihood,
)
from var_ext import sampler

# Parameters upstream trains without weight decay (train.py at the pin).
NO_WEIGHT_DECAY = {'cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC', 'pos_start',
                   'start_pos', 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias', 'scale_mul'}


def parameter_groups(var_wo_ddp):
    """Upstream's grouping rule (utils/lr_control.filter_params, which needs upstream's patched print):
    1-D tensors, biases and the embeddings above get no weight decay; `lr_sc`/`wd_sc` feed its schedule."""
    decay, no_decay, names, params = [], [], [], []
    for name, param in var_wo_ddp.named_parameters():
        if not param.requires_grad:
            continue
        names.append(name)
        params.append(param)
        skip = param.ndim == 1 or name.endswith('bias') or any(key in name for key in NO_WEIGHT_DECAY)
        (no_decay if skip else decay).append(param)
    groups = [{'params': decay, 'wd_sc': 1.0, 'lr_sc': 1.0}, {'params': no_decay, 'wd_sc': 0.0, 'lr_sc': 1.0}]
    return names, params, [g for g in groups if g['params']]


def build_optimizer(var_wo_ddp, lr: float, weight_decay: float, grad_clip: float, mixed_precision: int,
                    grad_accum: int = 1):
    """Upstream's AdamW(0.9, 0.95) over upstream's parameter groups, in upstream's `AmpOptimizer`.

    mixed_precision: 0 = fp32, 1 = fp16 (with loss scaling), 2 = bf16 (VAR's `--fp16` convention).
    grad_accum: micro-batches per update; AmpOptimizer divides each micro-batch loss by it.
    """
    from utils import amp_sc
    names, params, groups = parameter_groups(var_wo_ddp)
    fused = next(var_wo_ddp.parameters()).is_cuda
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=fused)
    return amp_sc.AmpOptimizer(mixed_precision=mixed_precision, optimizer=optimizer, names=names, paras=params,
                               grad_clip=grad_clip, n_gradient_accumulation=grad_accum)


# What `DDOTrainer.step` returns besides `DDOTerms.log_values()`, the names EDM2's stats.jsonl uses.
TIMINGS = ('Timing/seconds_generate', 'Timing/seconds_train')   # online reference sampling; forward, backward, step


def ddo_loss(var, ref_var, quantize, labels, real_tokens, fake_tokens, dropped, alpha: float, beta: float, amp_ctx):
    """Mean DDO loss of the pairs (real_i, fake_i), both conditioned on labels_i or, where dropped_i, on the
    unconditional class; alpha_i = 0 where dropped_i (section 5.3). Returns (loss, DDOTerms).

    `var` is the trained VAR (or its DDP wrapper), `ref_var` the frozen reference, `quantize` the VQVAE's
    quantiser (teacher-forcing inputs from token indices), `amp_ctx` the autocast context of both forwards.
    """
    batch = labels.shape[0]
    cond = torch.where(dropped, ref_var.num_classes, labels)
    both = [torch.cat(pair) for pair in zip(real_tokens, fake_tokens)]
    inputs = quantize.idxBl_to_var_input(both)
    targets = torch.cat(both, dim=1)
    with amp_ctx:
        logp = sequence_log_likelihood(var(torch.cat([cond, cond]), inputs), targets)
        with torch.no_grad():
            ref_logp = sequence_log_likelihood(ref_var(torch.cat([cond, cond]), inputs), targets)
    weights = label_dropout_alpha(alpha, dropped).to(labels.device)
    terms = autoregressive_ddo_terms(logp[:batch], ref_logp[:batch], logp[batch:], ref_logp[batch:], weights, beta)
    return terms.loss.mean(), terms


def mle_loss(var, quantize, labels, real_tokens, dropped, num_classes, train_loss, loss_weight, amp_ctx):
    """Upstream's training loss (`VARTrainer.train_step`), the matched control's: per-token cross-entropy
    `train_loss` of the teacher-forced pyramid, weighted per position by `loss_weight` (1/L each), summed over
    positions and averaged over the batch; labels replaced by the unconditional class `num_classes` where `dropped`."""
    cond = torch.where(dropped, num_classes, labels)
    targets = torch.cat(real_tokens, dim=1)
    with amp_ctx:
        logits = var(cond, quantize.idxBl_to_var_input(real_tokens))
        loss = train_loss(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).view(targets.shape)
    return loss.mul(loss_weight).sum(dim=-1).mean()


class DDOTrainer:
    """The DDO step (or, objective 'mle', upstream's MLE step) on top of an upstream `VARTrainer` (`base`) and a
    frozen reference VAR (unused by the MLE step)."""

    def __init__(self, base, ref_var, alpha: float, beta: float, label_drop: float = 0.5, seed: int = 0, rank: int = 0,
                 objective: str = 'ddo'):
        if objective not in OBJECTIVES:
            raise DDOPatchError(f'unknown objective {objective!r}; choose one of {", ".join(OBJECTIVES)}')
        if objective == 'ddo':
            check_hyperparameters(alpha, beta)
        if not 0 <= label_drop < 1:
            raise DDOPatchError(f'label dropout must lie in [0, 1), got {label_drop}')
        if base.var_wo_ddp.cond_drop_rate != 0:
            raise DDOPatchError('the trained VAR still draws its own label dropout; build it with var_ext.models.build')
        self.base, self.ref_var, self.objective = base, ref_var, objective
        self.alpha, self.beta, self.label_drop = alpha, beta, label_drop
        self.device = next(base.var_wo_ddp.parameters()).device
        self.seed, self.rank = seed, rank
        self.generator = torch.Generator(device=self.device)   # fake samples and dropout mask, reseeded per step

    @property
    def var_wo_ddp(self):
        return self.base.var_wo_ddp

    @torch.no_grad()
    def real_tokens(self, images: torch.Tensor):
        """Images in [-1, 1], [B, 3, H, W] -> token indices per scale, exactly as upstream's train_step."""
        return self.base.vae_local.img_to_idxBl(images)

    @torch.no_grad()
    def reference_tokens(self, labels: torch.Tensor):
        """Guidance-free, untruncated samples of the frozen reference for `labels` (appendix C)."""
        with self.base.var_opt.amp_ctx:
            return sampler.sample(self.ref_var, labels, cfg=0.0, generator=self.generator).tokens

    def check_labels(self, labels: torch.Tensor) -> None:
        num_classes = self.var_wo_ddp.num_classes
        if bool((labels < 0).any()) or bool((labels >= num_classes).any()):
            raise DDOPatchError(f'class labels must lie in [0, {num_classes}), got {labels.min().item()}..'
                                f'{labels.max().item()}; check the dataset or --num-classes')

    def loss(self, labels, real_tokens, fake_tokens, dropped):
        """`ddo_loss` of the trained VAR (through DDP) against the reference, under the optimiser's autocast."""
        return ddo_loss(self.base.var, self.ref_var, self.base.quantize_local, labels, real_tokens, fake_tokens, dropped,
                        self.alpha, self.beta, self.base.var_opt.amp_ctx)

    def step(self, labels: torch.Tensor, real_tokens, iteration: int, micro: int = 0, stepping: bool = True) -> dict:
        """One update (or, with stepping=False, one accumulated micro-batch) from a real batch given as labels [B]
        and token indices per scale; returns the batch means of what it logs.

        The reference samples and the dropout mask depend on (seed, rank, iteration, micro) only, so a
        resumed run draws what an uninterrupted one would have drawn.
        """
        self.check_labels(labels)
        sync = torch.cuda.synchronize if self.device.type == 'cuda' else (lambda: None)
        self.generator.manual_seed((((self.seed * 100_003 + self.rank) * 1_000_003 + iteration) * 1009 + micro) % 2 ** 63)
        self.base.var.require_backward_grad_sync = stepping   # DDP all-reduces on the last micro-batch only
        start = time.perf_counter()
        fake_tokens = self.reference_tokens(labels) if self.objective == 'ddo' else None
        sync()
        generated = time.perf_counter()
        dropped = torch.rand(labels.shape[0], generator=self.generator, device=self.device) < self.label_drop
        log = {}
        if self.objective == 'ddo':
            loss, terms = self.loss(labels, real_tokens, fake_tokens, dropped)
            log.update({name: values.mean().item() if values.numel() else float('nan')   # no kept label: no fake accuracy
                        for name, values in terms.log_values(fake_counted=~dropped).items()})
            log['DDO/kept_labels'] = (~dropped).float().mean().item()
        else:
            loss = mle_loss(self.base.var, self.base.quantize_local, labels, real_tokens, dropped, self.var_wo_ddp.num_classes,
                            self.base.train_loss, self.base.loss_weight, self.base.var_opt.amp_ctx)
        grad_norm, scale_log2 = self.base.var_opt.backward_clip_step(stepping=stepping, loss=loss)
        sync()
        grad_norm = float(grad_norm) if grad_norm is not None else float('nan')
        log.update({'Loss/loss': loss.item(), 'Loss/grad_norm': grad_norm,
                    TIMINGS[0]: generated - start, TIMINGS[1]: time.perf_counter() - generated})
        # Not finite: the loss, or the gradient norm of the step (fp16: a step upstream's scaler skips)
        log['Faults/nonfinite'] = float(not math.isfinite(log['Loss/loss']) or (stepping and not math.isfinite(grad_norm)))
        if scale_log2 is not None:
            log['Faults/loss_scale'] = 2.0 ** scale_log2
        return log

    def state_dict(self):
        """Upstream's trainer state (weights, optimiser, config) without the frozen, separately loaded VQVAE."""
        state = self.base.state_dict()
        state.pop('vae_local', None)
        return state

    def load_state_dict(self, state):
        self.base.load_state_dict(dict(state), strict=True, skip_vae=True)


def make_trainer(vae, var_wo_ddp, ref_var, var_ddp, opt, alpha, beta, label_drop=0.5, seed=0, rank=0, objective='ddo'):
    """Wrap the models in upstream's VARTrainer (no label smoothing) and our DDO (or MLE) step on top."""
    import trainer as var_trainer
    device = next(var_wo_ddp.parameters()).device
    patch_nums = tuple(var_wo_ddp.patch_nums)
    base = var_trainer.VARTrainer(device=device, patch_nums=patch_nums, resos=tuple(16 * pn for pn in patch_nums),
                                  vae_local=vae, var_wo_ddp=var_wo_ddp, var=var_ddp, var_opt=opt, label_smooth=0.0)
    return DDOTrainer(base, ref_var, alpha, beta, label_drop, seed, rank, objective)
