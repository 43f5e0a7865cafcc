"""`ddo-patch demo` at a reduced size: DDO must sharpen the MLE model without collapsing it (Figure 2)."""

import json

from click.testing import CliRunner

from ddo_patch.cli import main


def test_demo_quick_sharpens_without_collapse(tmp_path):
    result = CliRunner().invoke(main, ['demo', '--preset', 'quick', '--outdir', str(tmp_path), '--seed', '0'])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / 'demo.json').read_text())
    assert (tmp_path / 'demo.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    rounds = summary['rounds']
    assert [r['round'] for r in rounds] == list(range(summary['config']['rounds'] + 1))
    mle, final, gt = rounds[0], rounds[-1], summary['ground_truth']
    assert mle['low_density_fraction'] > 2 * gt['low_density_fraction']  # MLE really is blurry here
    # Sharper: higher mean log p_gt, clearly fewer samples in low-density regions...
    assert final['mean_log_p_gt'] > mle['mean_log_p_gt'] + 0.05
    assert final['low_density_fraction'] < 0.85 * mle['low_density_fraction']
    # ...not collapsed: coverage within 10% of the MLE model's.
    assert final['coverage'] > 0.9 * mle['coverage']
    # Self-play: every round's chosen model beats its reference (the previous round's), none is `kept`.
    log_p = [r['mean_log_p_gt'] for r in rounds]
    assert all(after > before for before, after in zip(log_p, log_p[1:])), log_p
    assert 'mean log p_gt' in result.output  # the per-round table


def test_demo_rejects_invalid_alpha(tmp_path):
    result = CliRunner().invoke(main, ['demo', '--alpha', '-1', '--outdir', str(tmp_path / 'out')])
    assert result.exit_code == 2
    assert 'alpha must be' in result.output
    assert not (tmp_path / 'out').exists()


def test_demo_is_deterministic_for_a_seed(tmp_path, monkeypatch):
    import dataclasses

    from ddo_patch import demo
    tiny = dataclasses.replace(demo.PRESETS['quick'], rounds=1, mle_steps=100, steps_per_round=20, eval_every=10,
                               batch=256, num_train=2000, num_fake=1000, num_eval=1000, sampler_steps=8)
    monkeypatch.setitem(demo.PRESETS, 'tiny', tiny)
    runs = [demo.run_demo(outdir=tmp_path / name, seed=3, preset='tiny', log=lambda *a: None) for name in 'ab']
    other = demo.run_demo(outdir=tmp_path / 'c', seed=4, preset='tiny', log=lambda *a: None)
    strip = lambda s: [{k: v for k, v in r.items() if k != 'seconds'} for r in s['rounds']]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])
    assert strip(runs[0]) != strip(other)
