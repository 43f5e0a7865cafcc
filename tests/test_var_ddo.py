"""The DDO step on a tiny random VAR: the loss at theta = theta_ref, a frozen reference, no fake-side signal on
dropped labels, and a few hundred steps moving the likelihood ratio the way the discriminator should."""

import copy
import math

import pytest
import torch

from var_ext import models, sampler
from var_ext.trainer import build_optimizer, make_trainer
from var_ext.datasets import split_scales
from var_tiny import TINY, build_tiny, draw_real_tokens, one_cpu_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.upstream, pytest.mark.usefixtures('one_cpu_thread')]


def tiny_trainer(alpha=10.0, beta=0.02, lr=1e-4, label_drop=0.5):
    vae, var = build_tiny()
    ref = models.frozen_copy(var)
    opt = build_optimizer(var, lr=lr, weight_decay=0.0, grad_clip=2.0, mixed_precision=0)
    return make_trainer(vae, var, ref, var, opt, alpha, beta, label_drop=label_drop)


def real_batch(batch, seed):
    labels = torch.arange(batch) % TINY.num_classes
    return labels, split_scales(draw_real_tokens(labels, torch.Generator().manual_seed(seed)), TINY.patch_nums)


def test_loss_at_the_reference_is_log2_times_one_plus_alpha_kept(var_root):
    trainer = tiny_trainer(alpha=10.0)
    labels, real = real_batch(16, seed=0)
    log = trainer.step(labels, real, iteration=0)
    assert 0 < log['DDO/kept_labels'] < 1     # both dropped and kept samples are present
    # per pair: log 2 (real) + alpha_i log 2 (fake), averaged over the batch
    assert log['Loss/loss'] == pytest.approx(math.log(2) * (1 + 10.0 * log['DDO/kept_labels']), abs=1e-5)
    assert log['DDO/delta_real'] == log['DDO/delta_fake'] == 0


def test_reference_never_changes_while_the_target_does(var_root):
    trainer = tiny_trainer(lr=1e-3)
    before = copy.deepcopy(trainer.ref_var.state_dict())
    target_before = copy.deepcopy(trainer.var_wo_ddp.state_dict())
    for it in range(3):
        trainer.step(*real_batch(8, seed=it), iteration=it)
    assert all(torch.equal(before[k], v) for k, v in trainer.ref_var.state_dict().items())
    assert not torch.equal(target_before['head.weight'], trainer.var_wo_ddp.head.weight)
    assert not any(p.requires_grad for p in trainer.ref_var.parameters())


def _grads(trainer, labels, real, fake, dropped):
    trainer.var_wo_ddp.zero_grad(set_to_none=True)
    loss, _ = trainer.loss(labels, real, fake, dropped)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in trainer.var_wo_ddp.parameters() if p.grad is not None])


def test_dropped_labels_get_no_fake_side_gradient(var_root):
    trainer = tiny_trainer(lr=1e-2)
    labels, real = real_batch(8, seed=1)
    trainer.step(labels, real, iteration=0)     # move theta away from theta_ref so that deltas are non-zero
    dropped = torch.tensor([True, False] * 4)
    fake = trainer.reference_tokens(labels)
    other = trainer.reference_tokens(labels)
    swap = lambda rows: [torch.where(rows[:, None], o, f) for f, o in zip(fake, other)]
    base = _grads(trainer, labels, real, fake, dropped)
    # replacing the reference samples of dropped-label pairs changes nothing ...
    torch.testing.assert_close(_grads(trainer, labels, real, swap(dropped), dropped), base, atol=1e-7, rtol=1e-5)
    # ... while replacing those of kept-label pairs does
    assert not torch.allclose(_grads(trainer, labels, real, swap(~dropped), dropped), base, atol=1e-6, rtol=1e-3)


@torch.no_grad()
def _mean_delta(trainer, labels, tokens):
    both = torch.cat(tokens, 1)
    inputs = trainer.base.quantize_local.idxBl_to_var_input(tokens)
    from ddo_patch.losses import sequence_log_likelihood
    logp = sequence_log_likelihood(trainer.var_wo_ddp(labels, inputs), both)
    ref = sequence_log_likelihood(trainer.ref_var(labels, inputs), both)
    return (logp - ref).mean().item()


def test_training_separates_real_from_reference_samples(var_root):
    torch.manual_seed(0)
    trainer = tiny_trainer(alpha=2.0, beta=0.1, lr=3e-4)
    for it in range(200):
        trainer.step(*real_batch(16, seed=100 + it), iteration=it)
    labels, real = real_batch(40, seed=99_999)          # held-out real sequences
    fake = sampler.sample(trainer.ref_var, labels, cfg=0, generator=torch.Generator().manual_seed(7)).tokens
    delta_real, delta_fake = _mean_delta(trainer, labels, real), _mean_delta(trainer, labels, fake)
    assert delta_real > 1.0 and delta_fake < -1.0, (delta_real, delta_fake)
