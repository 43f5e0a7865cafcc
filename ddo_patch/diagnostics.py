"""Is a DDO run healthy? Rules of thumb on the terms both adapters log, and the plot that shows them.

The implicit discriminator's logit on a sample x is beta * delta(x), delta = log p_theta(x) - log p_ref(x)
(Eq. 13; an ELBO difference for diffusion). A run logs, per status interval, the means over samples of delta
on real and on reference samples, the discriminator's accuracies, the fraction of samples with
|beta * delta| > 5 (`ddo_patch.losses.SATURATION`) and the loss. What they say:

- separation = beta * (delta_real - delta_fake): how far apart the discriminator puts real data and the
  reference's samples. It starts at 0 (theta = ref) and grows as the model learns what tells them apart. If it
  stays small, both against an absolute floor and against how far both logits have moved together, the loss
  is its first-order expansion: its gradient is (beta / 2) (-grad log p(real) + alpha grad log p(fake)), and
  Adam takes full-size steps along it whatever beta is, so the model lowers the likelihood of everything
  (alpha > 1) instead of separating: beta is too small. (With an exact sampler, VAR at cfg 0, a model at its
  MLE optimum cannot separate at all: there is nothing for DDO to do; docs/var.md.)
- saturated: the share of samples whose |beta * delta| > 5, where sigmoid's slope is under 3 % of its peak:
  their gradients have vanished, and the rest carry noise amplified by beta. A run that saturates most of
  its samples has beta too large (this rule goes first: a saturated run does not separate either).
- the evaluations: a run that never beat its start (lower is better) and went well above it diverged,
  whatever its terms say (a too-high learning rate can leave them looking healthy); so did one whose loss is
  not finite.

The thresholds are measured (benchmarks/diagnostics.py on the digits and exact-likelihood VAR benchmarks at a
good, a too-small and a too-large beta and a diverging learning rate; docs/diagnostics.md gives the figures).
Everything here reads only what a backend's `training_log`, `run_settings` and `run_evaluations` return.
"""

from __future__ import annotations

import math
from typing import NamedTuple

SEPARATION_TOO_SMALL = 0.05   # |separation| below this over the 2nd half: sigmoid within 1.3 % of 1/2 on both sides
SEPARATION_RELATIVE = 0.2     # ... or below this share of the larger |beta * delta|: both logits moved together
SATURATED_TOO_MANY = 0.25     # a quarter of the samples saturated over the 2nd half (measured: good runs <= 3 %, too large >= 58 %)
DIVERGED = 0.05               # an evaluation 5 % worse than the start, none better (measured: the MLE control's noise 2.4 %)

TERMS = ('DDO/delta_real', 'DDO/delta_fake', 'DDO/accuracy_real', 'DDO/accuracy_fake', 'DDO/saturated_real',
         'DDO/saturated_fake', 'Loss/loss')


class Flag(NamedTuple):
    rule: str       # 'not finite', 'beta too small', 'beta too large', 'diverged'
    reason: str     # one line for a user


def _second_half(log):
    return log[len(log) // 2:] if len(log) > 1 else log


def _mean(values):
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float('nan')


def series(log, beta) -> dict:
    """The plotted quantities per logged step: beta * delta on both sides, the separation, the saturated share."""
    out = {'step': [row['step'] for row in log], 'loss': [row.get('Loss/loss', float('nan')) for row in log]}
    if beta is None:
        return out
    get = lambda key: [row.get(key, float('nan')) for row in log]   # noqa: E731
    out['logit_real'] = [beta * d for d in get('DDO/delta_real')]
    out['logit_fake'] = [beta * d for d in get('DDO/delta_fake')]
    out['separation'] = [r - f for r, f in zip(out['logit_real'], out['logit_fake'])]
    out['accuracy_real'], out['accuracy_fake'] = get('DDO/accuracy_real'), get('DDO/accuracy_fake')
    out['saturated'] = [(r + f) / 2 for r, f in zip(get('DDO/saturated_real'), get('DDO/saturated_fake'))]
    return out


def summary(log, beta) -> dict:
    """Second-half means of what the rules read (the first half is the run finding its feet)."""
    half = series(_second_half(log), beta)
    return {key: _mean(values) for key, values in half.items() if key != 'step'}


def check(log, beta, evaluations=()) -> list:
    """The flags of one run: `log` its training log, `beta` its beta (None for an MLE run: only the loss and the
    evaluations are checked), `evaluations` [{'step', 'score'}] in order, the starting model's first if known."""
    bad = next((row for row in log if not math.isfinite(row.get('Loss/loss', 0.0))), None)
    if bad is not None:
        return [Flag('not finite', f'the loss is {bad["Loss/loss"]} from step {bad["step"]:g} on: the run diverged; '
                                   f'lower the learning rate')]
    flags = []
    scores = [e['score'] for e in evaluations if e.get('score') is not None]
    if len(scores) >= 2 and math.isfinite(scores[0]):
        start, worst = scores[0], max(scores[1:], key=lambda x: x if math.isfinite(x) else float('inf'))
        rise = (worst - start) / abs(start) if start else float('inf')
        if min(scores[1:]) >= start and (not math.isfinite(worst) or rise > DIVERGED):
            flags.append(Flag('diverged', f'the score never beat the start ({start:.4g}) and reached {worst:.4g} ({rise:+.0%}): '
                                          f'lower the learning rate (or alpha)'))
    if beta is not None and log:
        s = summary(log, beta)
        shift = max(abs(s['logit_real']), abs(s['logit_fake']))
        if s['saturated'] > SATURATED_TOO_MANY:
            flags.append(Flag('beta too large', f'{s["saturated"]:.0%} of the samples have |beta * delta| > 5 over the 2nd half '
                                                f'(healthy: <= {SATURATED_TOO_MANY:.0%}): their gradients vanish; lower beta'))
        elif abs(s['separation']) < max(SEPARATION_TOO_SMALL, SEPARATION_RELATIVE * shift):
            flags.append(Flag('beta too small', f'beta * (delta_real - delta_fake) is {s["separation"]:.2g} over the 2nd half, '
                                                f'both logits moved by up to {shift:.2g} (healthy: separation >= {SEPARATION_TOO_SMALL:g} '
                                                f'and >= {SEPARATION_RELATIVE:g} x that): the discriminator does not separate real '
                                                f'from reference samples; raise beta (or, with an exact sampler from an MLE optimum, '
                                                f'there is nothing to separate)'))
    return flags


def plot(runs, path, step_unit: str, metric: str, title: str = ''):
    """One figure for several runs (sweep points, or a single run): beta * delta on real (solid) and reference
    (dashed) samples, the separation, the accuracies, the saturated share, the loss, the evaluations. `runs`:
    [{'name', 'beta', 'log', 'evaluations', 'flags'}]; a flagged run's name carries its rules."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    (logits, separation, accuracy), (saturated, loss, scores) = axes
    for i, run in enumerate(runs):
        color, s = f'C{i % 10}', series(run['log'], run['beta'])
        name = run['name'] + (f'  [{", ".join(f.rule for f in run["flags"])}]' if run['flags'] else '')
        if run['beta'] is not None:
            logits.plot(s['step'], s['logit_real'], '-', color=color, label=name)
            logits.plot(s['step'], s['logit_fake'], '--', color=color)
            separation.plot(s['step'], s['separation'], '-', color=color)
            accuracy.plot(s['step'], s['accuracy_real'], '-', color=color)
            accuracy.plot(s['step'], s['accuracy_fake'], '--', color=color)
            saturated.plot(s['step'], s['saturated'], '-', color=color)
        loss.plot(s['step'], s['loss'], '-', color=color, label=name if run['beta'] is None else None)
        if run['evaluations']:
            scores.plot([e['step'] for e in run['evaluations']], [e['score'] for e in run['evaluations']], 'o-', color=color)
    logits.axhline(0, color='0.6', lw=0.8)
    separation.axhspan(-SEPARATION_TOO_SMALL, SEPARATION_TOO_SMALL, color='C3', alpha=0.12, label='too small')
    saturated.axhspan(SATURATED_TOO_MANY, 1, color='C3', alpha=0.12, label='too many')
    accuracy.axhline(0.5, color='0.6', lw=0.8)
    for ax, label in ((logits, 'beta * delta: real (solid), reference (dashed)'), (separation, 'separation beta * (delta_real - delta_fake)'),
                      (accuracy, 'discriminator accuracy: real (solid), reference (dashed)'), (saturated, 'share with |beta * delta| > 5'),
                      (loss, 'loss'), (scores, f'{metric} (lower is better)')):
        ax.set(xlabel=step_unit, title=label)
    separation.set_yscale('symlog', linthresh=SEPARATION_TOO_SMALL / 5)
    plotted = [e['score'] for run in runs for e in run['evaluations'] if e['score'] is not None and math.isfinite(e['score'])]
    if plotted and min(plotted) > 0 and max(plotted) > 10 * min(plotted):   # a diverged run beside the others
        scores.set_yscale('log')
    saturated.set_ylim(-0.02, 1.02)
    handles = [h for ax in (logits, loss) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles, [h.get_label() for h in handles], loc='upper center', ncol=min(4, max(1, len(handles))), fontsize=9)
    if title:
        fig.suptitle(title, y=0.005, va='bottom', fontsize=10)
    fig.tight_layout(rect=(0, 0.02, 1, 0.93))
    fig.savefig(path, dpi=90)
    plt.close(fig)
