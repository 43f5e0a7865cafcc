"""`ddo_patch.diagnostics` (the rules and the plot) and `ddo-patch inspect` on run directories of both adapters' formats."""

import json
import math

import pytest
from click.testing import CliRunner

from ddo_patch import diagnostics
from ddo_patch.cli import main


def var_like_log(steps, delta_real, delta_fake, saturated=0.0, loss=1.0):
    return [{'step': s, 'DDO/delta_real': delta_real(s), 'DDO/delta_fake': delta_fake(s), 'DDO/accuracy_real': 0.6,
             'DDO/accuracy_fake': 0.7, 'DDO/saturated_real': saturated, 'DDO/saturated_fake': saturated,
             'Loss/loss': loss(s) if callable(loss) else loss} for s in steps]


def rules(flags):
    return [flag.rule for flag in flags]


def test_a_separating_unsaturated_run_that_improves_is_healthy():
    log = var_like_log(range(1, 41), lambda s: 0.1 * s, lambda s: -0.2 * s, saturated=0.1)
    assert diagnostics.check(log, 0.1, [dict(step=0, score=10.0), dict(step=20, score=8.0)]) == []
    summary = diagnostics.summary(log, 0.1)   # the 2nd half: steps 21-40, mean step 30.5
    assert summary['separation'] == pytest.approx(0.1 * 0.3 * 30.5)
    assert summary['logit_real'] == pytest.approx(0.1 * 0.1 * 30.5) and summary['saturated'] == pytest.approx(0.1)


def test_each_rule_fires_on_its_symptom_with_a_one_line_reason():
    flat = var_like_log(range(1, 41), lambda s: 0.01, lambda s: 0.0)   # separation 0.001 * beta 1
    assert rules(diagnostics.check(flat, 1.0)) == ['beta too small']
    early_only = var_like_log(range(1, 41), lambda s: 1.0 if s <= 20 else 0.0, lambda s: 0.0)   # the 2nd half decides
    assert rules(diagnostics.check(early_only, 1.0)) == ['beta too small']
    drifting = var_like_log(range(1, 41), lambda s: -7.0, lambda s: -7.6)   # both logits fell by ~0.7, 0.06 apart
    flags = diagnostics.check(drifting, 0.1)
    assert rules(flags) == ['beta too small'] and 'both logits moved by up to 0.76' in flags[0].reason
    assert diagnostics.check(var_like_log(range(1, 41), lambda s: -7.0, lambda s: -9.0), 0.1) == []   # 0.2 apart: separating
    unseparated = var_like_log(range(1, 41), lambda s: 100.0, lambda s: 100.0, saturated=0.8)   # saturated and not separating
    assert rules(diagnostics.check(unseparated, 1.0)) == ['beta too large']
    saturated = var_like_log(range(1, 41), lambda s: 100.0, lambda s: -100.0, saturated=0.3)
    flags = diagnostics.check(saturated, 1.0)
    assert rules(flags) == ['beta too large'] and '30% of the samples' in flags[0].reason and '\n' not in flags[0].reason
    nan = var_like_log(range(1, 11), lambda s: 1.0, lambda s: -1.0, loss=lambda s: math.nan if s >= 7 else 1.0)
    flags = diagnostics.check(nan, 1.0, [dict(step=0, score=1.0), dict(step=5, score=math.nan)])
    assert rules(flags) == ['not finite'] and 'from step 7' in flags[0].reason
    good = var_like_log(range(1, 41), lambda s: 1.0, lambda s: -1.0)
    jumped = [dict(step=0, score=49.96), dict(step=8, score=54.97), dict(step=80, score=52.18)]   # VAR at 30x the lr (measured)
    flags = diagnostics.check(good, 1.0, jumped)
    assert rules(flags) == ['diverged'] and 'reached 54.97 (+10%)' in flags[0].reason
    wrong_way = var_like_log(range(1, 41), lambda s: -0.45, lambda s: -0.35)   # real data pushed below the reference samples
    assert rules(diagnostics.check(wrong_way, 1.0, jumped)) == ['diverged']
    drifted = [dict(step=0, score=11.55), dict(step=1, score=25.4), dict(step=4, score=211.9)]   # digits at beta 0.003 (measured)
    assert rules(diagnostics.check(drifting, 0.1, drifted)) == ['diverged', 'beta too small']
    recovered = [dict(step=0, score=49.0), dict(step=8, score=48.0), dict(step=16, score=65.5)]   # it was better once
    assert diagnostics.check(good, 1.0, recovered) == []
    control = [dict(step=0, score=11.55), dict(step=2, score=11.83)]   # the digits MLE control: +2.4 %, noise
    assert diagnostics.check([dict(step=1, **{'Loss/loss': 1.0})], None, control) == []
    assert rules(diagnostics.check([dict(step=1, **{'Loss/loss': 1.0})], None, jumped)) == ['diverged']   # MLE: no beta rules


def write_var_run(run_dir, beta=0.5, objective='ddo'):
    run_dir.mkdir()
    (run_dir / 'training_options.json').write_text(json.dumps(dict(ddo_alpha=2.0, ddo_beta=beta, label_drop=0.5, objective=objective)))
    rows = var_like_log(range(1, 21), lambda s: 0.2 * s, lambda s: -0.2 * s, saturated=0.05,
                        loss=lambda s: 1.0 / s)
    lines = [json.dumps(dict({k: v for k, v in r.items() if k != 'step'}, iteration=r['step'])) for r in rows]
    (run_dir / 'log.jsonl').write_text('\n'.join(lines + lines[-3:]) + '\n')   # a resumed run repeats its last steps
    (run_dir / 'metrics.jsonl').write_text('\n'.join(json.dumps({'iteration': i, 'cfg=0': 5 - i / 10, 'score': 5 - i / 10, 'best': i})
                                                     for i in (0, 10, 20)) + '\n')


def test_inspect_reads_a_var_run_through_its_backend(tmp_path):
    write_var_run(tmp_path / 'run')
    result = CliRunner().invoke(main, ['inspect', str(tmp_path / 'run')])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f'{tmp_path / "run"}: var run, DDO, alpha 2, beta 0.5; 20 logged steps (iterations 1-20), 3 evaluations'
    assert 'separation 3.1' in lines[1]   # 0.5 * 0.4 * mean(11..20) = 3.1
    assert lines[2] == '  evaluations: 5 (step 0) -> best 3 -> last 3'
    assert lines[3] == '  healthy: no rule of docs/diagnostics.md flags this run'
    assert (tmp_path / 'run' / 'diagnostics.png').read_bytes()[:4] == b'\x89PNG'


def test_inspect_reads_an_edm2_run_and_flags_a_tiny_beta(tmp_path):
    run = tmp_path / 'edm2'
    run.mkdir()
    (run / 'training_options.json').write_text(json.dumps({'loss_kwargs': {'class_name': 'edm2_ext.loss.DDOLoss', 'alpha': 2.0, 'beta': 0.001}}))
    stats = [{'Progress/kimg': 0.0, 'Timing/total_sec': 1.0}] + [
        {'Progress/kimg': 0.256 * i, 'DDO/delta_real': -3.0, 'DDO/delta_fake': -5.0, 'DDO/accuracy_real': 0.2, 'DDO/accuracy_fake': 0.9,
         'DDO/saturated_real': 0.0, 'DDO/saturated_fake': 0.0, 'Loss/loss': 1.4} for i in range(1, 9)]
    (run / 'stats.jsonl').write_text('\n'.join(map(json.dumps, stats)) + '\n')
    (run / 'eval.json').write_text(json.dumps({'settings': {'metrics': ['fid']}, 'results': [
        {'snapshot': 'network-snapshot-0000001-0.050.pkl', 'fid': 7.0}, {'snapshot': 'network-snapshot-0000002-0.050.pkl', 'fid': 6.5}]}))
    result = CliRunner().invoke(main, ['inspect', str(run), '--plot', str(tmp_path / 'p.png')])
    assert result.exit_code == 0, result.output
    assert 'edm2 run, DDO, alpha 2, beta 0.001; 8 logged steps (kimg 0.256-2.048), 2 evaluations' in result.output
    assert '  beta too small: beta * (delta_real - delta_fake) is 0.002 over the 2nd half' in result.output
    assert (tmp_path / 'p.png').is_file() and not (run / 'diagnostics.png').exists()


def test_inspect_refuses_what_is_not_a_run_in_one_line(tmp_path):
    (tmp_path / 'empty').mkdir()
    for args, message in ((['inspect', str(tmp_path / 'empty')], 'is not a training run of an installed backend (edm2, var)'),
                          (['inspect', str(tmp_path / 'missing')], 'is not a directory'),
                          (['inspect', str(tmp_path / 'empty'), '--backend', 'no.such.Backend'], "unknown backend 'no.such.Backend'")):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    assert not (tmp_path / 'empty' / 'diagnostics.png').exists()
