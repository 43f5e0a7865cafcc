"""Expected per-GPU memory of a `var_ext.train` step, counted on the meta device (`ddo_patch.memory`).

    python -m var_ext.memory --depth 30 --batch-gpu 2 --global-batch 1024 --gpus 16    # VAR-d30, seconds on a CPU

`ddo_step` is one micro-batch of `var_ext.train` on meta copies of the models: `var_ext.trainer.ddo_loss` on
batch_gpu real and as many reference pyramids (the trained VAR over 2 x batch_gpu sequences with backward,
the reference over the same under no_grad), then upstream's `AmpOptimizer.backward_clip_step` (backward,
gradient-norm clipping, AdamW, `zero_grad(set_to_none=True)`). Attention is counted as on a GPU: VAR's
training forward passes its block-causal mask to torch's `scaled_dot_product_attention` (or xformers'
`memory_efficient_attention` when installed), which on CUDA runs the memory-efficient kernel: no B x H x L x L
matrix is stored, only the output and its log-sum-exp. On the meta device torch would pick the math
kernel, so `efficient_attention()` swaps upstream's `slow_attn` for that kernel during the count.

Not in the step: tokenising the rank's real images through the VQVAE encoder (no grad, before the
micro-batches, counted separately at the per-rank batch; the larger of the two is the step's figure) and
the reference's online sampling (no grad, KV cache of 2 x L x width per layer and sequence: far smaller).
Counted in fp32: under `--amp bf16` most saved activations take half the bytes, and autocast keeps a bf16
copy of the weights (2P) for the step. The fixed state adds the frozen VQVAE's fp32 weights.
"""

from __future__ import annotations

import argparse

import torch

from ddo_patch import memory
from ddo_patch.scoped import swapped
from var_ext import models
from var_ext.trainer import build_optimizer, ddo_loss, mle_loss


def _efficient_attention(query, key, value, scale, attn_mask=None, dropout_p=0.0):
    """Upstream's `slow_attn(q, k, v, scale, attn_mask, dropout_p)` (BHLc) through the memory-efficient kernel."""
    bias = None if attn_mask is None else attn_mask.expand(query.shape[0], query.shape[1], -1, -1)
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, dropout_p, False, scale=scale)[0]


def efficient_attention():
    """Within the block, upstream VAR's attention runs the kernel CUDA runs for its masked training forward."""
    from models import basic_var
    return swapped(basic_var, 'slow_attn', _efficient_attention)


def random_batch(cfg: models.VARConfig, batch: int, device):
    """Labels, real and fake token pyramids and a label-dropout mask, as `DDOTrainer.step` passes them on."""
    def pyramid():
        return [torch.randint(cfg.vae_vocab, (batch, pn * pn), device=device) for pn in cfg.patch_nums]
    labels = torch.randint(cfg.num_classes, (batch,), device=device)
    return labels, pyramid(), pyramid(), torch.rand(batch, device=device) < 0.5


def ddo_step(var, ref, quantize, opt, labels, real_tokens, fake_tokens, dropped, alpha=50.0, beta=0.02):
    """One micro-batch of `var_ext.train` that steps: the DDO loss and upstream's backward, clip and AdamW step."""
    loss, _ = ddo_loss(var, ref, quantize, labels, real_tokens, fake_tokens, dropped, alpha, beta, opt.amp_ctx)
    opt.backward_clip_step(stepping=True, loss=loss)


def mle_step(var, quantize, opt, labels, real_tokens, dropped):
    """The same micro-batch under `--objective mle`: upstream's cross-entropy on the real pyramids only."""
    length = sum(tokens.shape[1] for tokens in real_tokens)
    loss = mle_loss(var, quantize, labels, real_tokens, dropped, var.num_classes, torch.nn.CrossEntropyLoss(reduction='none'),
                    torch.full((1, length), 1 / length, device=labels.device), opt.amp_ctx)
    opt.backward_clip_step(stepping=True, loss=loss)


def step_memory(cfg: models.VARConfig, batch_gpu: int, batch_rank: int | None = None, ddp: bool = True,
                objective: str = 'ddo') -> memory.MemoryEstimate:
    """Expected per-GPU peak of training the VAR of `cfg` (DDO, or the MLE control) at `batch_gpu` real samples
    per pass; with `batch_rank`, the rank's real images are tokenised at once before its micro-batches (`--data`)."""
    device = torch.device('meta')
    vae, var = models.build(cfg, device)
    ref = models.frozen_copy(var) if objective == 'ddo' else None
    var.train()
    opt = build_optimizer(var, lr=4e-6, weight_decay=0.05, grad_clip=2.0, mixed_precision=0)
    memory.create_optimizer_state(opt.optimizer)
    labels, real_tokens, fake_tokens, dropped = random_batch(cfg, batch_gpu, device)
    with efficient_attention():
        if objective == 'ddo':
            step = memory.step_peak(lambda: ddo_step(var, ref, vae.quantize, opt, labels, real_tokens, fake_tokens, dropped))
        else:
            step = memory.step_peak(lambda: mle_step(var, vae.quantize, opt, labels, real_tokens, dropped))
    if batch_rank:
        images = torch.empty(batch_rank, 3, cfg.resolution, cfg.resolution, device=device)
        with torch.no_grad():
            step = max(step, memory.step_peak(lambda: vae.img_to_idxBl(images)))
    fixed = memory.training_state(memory.parameter_count(var), ddp, reference=ref is not None,
                                  vqvae=4 * memory.parameter_count(vae))
    return memory.MemoryEstimate(batch_gpu, fixed, step)


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m var_ext.memory', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--var-root', metavar='DIR', help='FoundationVision/VAR checkout (default: $VAR_ROOT, then the ddo-patch cache)')
    p.add_argument('--depth', metavar='INT', type=int, default=16, help='VAR depth (default: %(default)s)')
    p.add_argument('--batch-gpu', metavar='INT', type=int, action='append', help='real samples per rank and pass; repeat for several (default: 16)')
    p.add_argument('--global-batch', metavar='INT', type=int, default=1024, help='real samples per iteration (default: %(default)s)')
    p.add_argument('--gpus', metavar='INT', type=int, default=8, help='processes; more than one adds DDP buckets (default: %(default)s)')
    p.add_argument('--tokens', action='store_true', help='the data set gives token pyramids: no images to tokenise')
    args = p.parse_args(argv)
    models.activate_upstream(args.var_root)
    cfg = models.VARConfig(depth=args.depth)
    print(f'VAR-d{args.depth}, global batch {args.global_batch} on {args.gpus} processes ({args.global_batch // args.gpus} per rank)')
    for batch_gpu in args.batch_gpu or [16]:
        batch_rank = None if args.tokens else args.global_batch // args.gpus
        print(step_memory(cfg, batch_gpu, batch_rank, args.gpus > 1).describe())


if __name__ == '__main__':
    main()
