"""Mixed precision and DDO's log-ratio on a tiny random VAR (CPU autocast): identical weights give delta exactly 0
in every precision, in benchmarks/var_amp_delta.py and in the trainer's own step (issue 10, item 5)."""

import math
import os

import pytest
import torch
from var_tiny import TINY, build_tiny, one_cpu_thread  # noqa: F401 (fixture)

from var_ext import models, sampler
from var_ext.trainer import build_optimizer, make_trainer

pytestmark = [pytest.mark.upstream, pytest.mark.usefixtures('one_cpu_thread')]
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')


@pytest.fixture
def amp_delta(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import var_amp_delta
    return var_amp_delta


def tiny_pyramids(amp_delta, batch=4):
    vae, ref = build_tiny()
    amp_delta.trained_scales(ref, logit_std=3.0)
    ref.eval().requires_grad_(False)
    labels = torch.arange(batch) % TINY.num_classes
    tokens = sampler.sample(ref, labels, cfg=0.0, seeds=list(range(batch))).tokens
    return vae, ref, labels, amp_delta.teacher_forcing(vae, tokens)


def test_identical_weights_give_exactly_zero_delta_under_autocast(var_root, amp_delta):
    """~2 s. The check of the benchmark, at tiny size; autocast really rounds (log p moves), delta does not."""
    _, ref, labels, (inputs, targets) = tiny_pyramids(amp_delta)
    assert amp_delta.identical_weights_give_zero(ref, labels, inputs, targets, amp_delta.PRECISIONS) == \
        {'fp32': 0.0, 'bf16': 0.0, 'fp16': 0.0}
    exact = amp_delta.log_likelihood(ref, labels, inputs, targets, 'fp32')
    for precision in ('bf16', 'fp16'):
        assert not torch.equal(amp_delta.log_likelihood(ref, labels, inputs, targets, precision), exact)
    # a perturbed copy is not identical: the same check then fails
    theta = amp_delta.perturbed(ref, 1e-3, seed=1)
    delta = amp_delta.log_likelihood(theta, labels, inputs, targets, 'fp32') - exact
    assert bool((delta != 0).all())


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_the_trainers_step_at_the_reference_gives_zero_delta_under_autocast(var_root, amp_delta, dtype):
    """~2 s each. The trained VAR (train mode, with gradients) and the frozen reference (eval mode, no_grad) run
    in one autocast context as on CUDA: at theta = theta_ref every delta is exactly 0 and the loss is exactly
    log 2 * (1 + alpha * kept fraction)."""
    vae, var = build_tiny()
    amp_delta.trained_scales(var, logit_std=3.0)
    ref = models.frozen_copy(var)
    opt = build_optimizer(var, lr=1e-4, weight_decay=0.0, grad_clip=2.0, mixed_precision=0)
    trainer = make_trainer(vae, var, ref, var, opt, alpha=10.0, beta=0.02)
    trainer.base.var_opt.amp_ctx = torch.autocast('cpu', dtype=dtype)   # AmpOptimizer autocasts on CUDA only
    labels = torch.arange(4) % TINY.num_classes
    real = sampler.sample(ref, labels, cfg=0.0, seeds=list(range(100, 104))).tokens
    dropped = torch.tensor([True, False] * 2)
    loss, terms = trainer.loss(labels, real, trainer.reference_tokens(labels), dropped)
    assert bool((terms.delta_real == 0).all()) and bool((terms.delta_fake == 0).all())
    assert loss.item() == pytest.approx(math.log(2) * (1 + 10.0 * 0.5), rel=1e-6)
