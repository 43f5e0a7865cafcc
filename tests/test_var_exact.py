"""The exact-likelihood VAR world (`var_ext.exact`): exact sampler likelihoods at every guidance scale, metrics that
take token pyramids, and (marked upstream) a reduced run of `benchmarks/var_exact.py` asserting that DDO raises the
teacher log-likelihood of guidance-free samples by far more than its noise."""

import os
import sys

import numpy as np
import pytest
import torch

from var_ext import exact, models, sampler
from var_ext.evaluator import Evaluator
from var_tiny import build_tiny, one_cpu_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.upstream, pytest.mark.usefixtures('one_cpu_thread')]

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))


@pytest.mark.parametrize('cfg', [0.0, 2.0])
def test_guided_log_likelihood_is_the_distribution_the_sampler_draws(var_root, cfg):
    """(1 s) Three tokens' vocabulary and patch_nums (1, 2): all 3^5 pyramids enumerated; their exact probabilities sum
    to 1, and 20k sampler draws (KV-cached, guided on 2B rows at cfg 2) match them in total variation."""
    cfg_tiny = models.VARConfig(depth=1, patch_nums=(1, 2), num_classes=2, vae_vocab=3, vae_z_channels=8, vae_ch=32)
    _, var = build_tiny(str(var_root), cfg=cfg_tiny)
    var.head.weight.data.normal_(0, 2.0)
    var.eval()
    grid = torch.cartesian_prod(*[torch.arange(3)] * 5)
    labels = torch.ones(len(grid), dtype=torch.long)
    with torch.no_grad():
        probabilities = exact.guided_log_likelihood(var, labels, grid, cfg).exp()
    assert float(probabilities.sum()) == pytest.approx(1.0, abs=1e-5)
    draws = sampler.sample(var, torch.ones(20000, dtype=torch.long), cfg=cfg, generator=torch.Generator().manual_seed(0)).sequence
    index = (draws * torch.tensor([81, 27, 9, 3, 1])).sum(1)
    frequencies = torch.bincount(index, minlength=len(grid)).double() / len(draws)
    assert 0.5 * float((frequencies - probabilities.double()).abs().sum()) < 0.03   # ~0.015 from sampling alone


def test_a_metric_that_takes_tokens_gets_the_sampled_pyramids(var_root, tmp_path):
    """(1 s) `takes_tokens = True`: the metric receives int64 [N, L] pyramids, those of the seeds in order, not images."""
    _, var = build_tiny(str(var_root))
    received = {}

    def metric(samples, labels):
        received.update(samples=samples, labels=labels)
        return 0.0
    metric.takes_tokens = True
    Evaluator(metric, range(7), (0.0,), str(tmp_path), batch=3)(var)
    expected = sampler.sample(var, torch.arange(7) % var.num_classes, seeds=list(range(7))).sequence
    assert received['samples'].dtype == np.int64 and np.array_equal(received['samples'], expected.numpy())
    assert received['labels'].tolist() == (np.arange(7) % var.num_classes).tolist()


def test_a_short_ddo_round_raises_the_precision_of_guidance_free_samples(var_root, tmp_path):
    """(~70 s) `benchmarks/var_exact.py --size quick`: a 10-class world, a 200-step MLE student, one 16-iteration
    round of `python -m var_ext.train`. The teacher log-likelihood of 2000 guidance-free samples rises by several
    times its noise: the larger of the student's own difference over two disjoint seed sets and the standard error
    of a difference of two independent means; both exact KL divergences between the sampler and p_data fall. (This
    student is not converged, so continued MLE gains nearly as much here: the control is the full run's job.)"""
    import var_exact
    result = var_exact.main(['--outdir', str(tmp_path / 'run'), '--size', 'quick'])
    mle = var_exact.row(result['rows'], 'MLE student', 0)['precision']
    targets = result['targets']
    noise = max(targets['precision_noise_cfg0'], 2 ** 0.5 * mle['se'])
    assert targets['precision_gain_ddo_cfg0'] > 4 * noise, (targets, mle)
    assert targets['ddo_cfg0_kls_below_mle_every_scale'], result['rows']
