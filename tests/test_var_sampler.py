"""The guidance-free sampler against upstream's `autoregressive_infer_cfg` on a tiny random VAR."""

import pytest
import torch

from var_ext import sampler
from var_tiny import build_tiny, one_cpu_thread  # noqa: F401 (fixture)

pytestmark = [pytest.mark.upstream, pytest.mark.usefixtures('one_cpu_thread')]


@pytest.fixture(scope='module')
def tiny(var_root):
    vae, var = build_tiny()
    return var.eval()


def _greedy_recorder(store, keepdim):
    """A stand-in for a token-drawing function: records the logits it gets and returns their argmax, so that
    both samplers follow the same prefix. Upstream's returns [B, l, 1], ours [B, l]."""
    def pick(logits, *args, **kwargs):
        store.append(logits.clone())
        return logits.argmax(-1, keepdim=keepdim)
    return pick


@pytest.mark.parametrize('cfg', [0.0, 1.5])
def test_logits_match_upstream_on_the_same_prefix(tiny, monkeypatch, cfg):
    import models.var as upstream_var
    theirs, ours = [], []
    monkeypatch.setattr(upstream_var, 'sample_with_top_k_top_p_', _greedy_recorder(theirs, keepdim=True))
    monkeypatch.setattr(sampler, '_draw', _greedy_recorder(ours, keepdim=False))
    labels = torch.tensor([0, 3, 7, 9])
    image_theirs = tiny.autoregressive_infer_cfg(B=4, label_B=labels, cfg=cfg)
    result = sampler.sample(tiny, labels, cfg=cfg, decode=True)
    assert len(theirs) == len(ours) == len(tiny.patch_nums)
    for a, b in zip(theirs, ours):   # upstream's mixed logits (1 + t) cond - t uncond, t = cfg si / (n - 1)
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.images, image_theirs, atol=1e-5, rtol=0)


def test_guidance_free_runs_the_conditional_rows_only(tiny):
    rows = []
    hook = tiny.blocks[0].register_forward_hook(lambda module, args, output: rows.append(len(tiny.blocks[0].attn.cached_k)))
    try:
        sampler.sample(tiny, torch.tensor([1, 2, 3]), cfg=0)
        sampler.sample(tiny, torch.tensor([1, 2, 3]), cfg=1.0)
    finally:
        hook.remove()
    assert rows == [3] * 4 + [6] * 4   # upstream always runs 2B rows, also at cfg=0


def test_draws_follow_the_filtered_distribution_of_upstream(var_root):
    from models.helpers import sample_with_top_k_top_p_
    logits = torch.log(torch.tensor([[[0.02, 0.3, 0.05, 0.25, 0.2, 0.08, 0.06, 0.04]]])).expand(4000, 1, 8).contiguous()
    filtered = sampler.filter_top_k_top_p(logits, top_k=5, top_p=0.8)
    ours = sampler._draw(filtered, torch.Generator().manual_seed(0))
    theirs = sample_with_top_k_top_p_(logits.clone(), top_k=5, top_p=0.8, rng=torch.Generator().manual_seed(0))[..., 0]
    ours_freq, theirs_freq = (torch.bincount(t.flatten(), minlength=8).float() / 4000 for t in (ours, theirs))
    assert set(ours.unique().tolist()) == set(theirs.unique().tolist()) == {1, 3, 4}   # the kept support
    torch.testing.assert_close(ours_freq, filtered[0, 0].softmax(-1), atol=0.03, rtol=0)
    torch.testing.assert_close(ours_freq, theirs_freq, atol=0.04, rtol=0)


def test_guidance_weight_ramps_like_upstream():
    assert [sampler.guidance_weight(1.5, si, 4) for si in range(4)] == [0.0, 0.5, 1.0, 1.5]


def test_per_sample_seeds_do_not_depend_on_the_batch(tiny):
    labels = torch.tensor([2, 5, 8])
    batch = sampler.sample(tiny, labels, seeds=[10, 11, 12]).sequence
    alone = sampler.sample(tiny, labels[1:2], seeds=[11]).sequence
    again = sampler.sample(tiny, labels, seeds=[10, 11, 12]).sequence
    other = sampler.sample(tiny, labels, seeds=[20, 21, 22]).sequence
    assert torch.equal(batch[1:2], alone) and torch.equal(batch, again)
    assert not torch.equal(batch, other)
    assert batch.shape == (3, 1 + 4 + 9 + 16)


def test_top_k_top_p_keep_only_the_most_likely_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))
    assert torch.isfinite(sampler.filter_top_k_top_p(logits, top_k=2)).tolist() == [[[True, True, False, False]]]
    assert torch.isfinite(sampler.filter_top_k_top_p(logits, top_p=0.7)).tolist() == [[[True, True, False, False]]]
    assert torch.isfinite(sampler.filter_top_k_top_p(logits, top_p=0.85)).tolist() == [[[True, True, True, False]]]
    assert torch.isfinite(sampler.filter_top_k_top_p(logits)).all()
