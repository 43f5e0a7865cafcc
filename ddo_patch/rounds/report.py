"""Reading a round manager's work directory: where it stands (`status`), and the per-round table and plot
of the metric and of the cost in images seen against pretraining, with each round's diagnostics: every run's
DDO terms over the round next to its evaluations, and the points flagged by `ddo_patch.diagnostics` (`report`)."""

from __future__ import annotations

import os

from ddo_patch import diagnostics
from ddo_patch.errors import DDOPatchError
from ddo_patch.rounds import manifest
from ddo_patch.rounds.backend import load_backend_class
from ddo_patch.rounds.launch import RUNNING


def load(workdir) -> dict:
    m = manifest.load(workdir)
    if m is None:
        raise DDOPatchError(f'{workdir} has no {manifest.MANIFEST}; start it with `ddo-patch rounds run CONFIG --workdir {workdir}`')
    return m


def _score(value):
    return '-' if value is None else f'{value:.4g}'


def status_lines(workdir) -> list:
    m = load(workdir)
    cfg = m['config']
    lines = [f'{workdir}: {m["status"]}' + (f' ({m["stop_reason"]})' if m['stop_reason'] else '') +
             f'; backend {m["backend"]}, {len(m["rounds"])} of at most {cfg["rounds"]} rounds started, sweep '
             f'{cfg["sweep"]["policy"]} over {len(cfg["alphas"]) * len(cfg["betas"])} points']
    for r in m['rounds']:
        points = len(r['points']) if r['points'] else len(cfg['alphas']) * len(cfg['betas'])
        done = sum(run['status'] == 'done' for run in r['runs'])
        failed = sum(run['status'] == 'failed' for run in r['runs'])
        stopped = sum(run['status'] == 'stopped' for run in r['runs'])
        chosen = (f'reference {_score(r["reference_score"])}, chosen {r["chosen"]["run"]} step {r["chosen"]["step"]}: '
                  f'{_score(r["chosen"]["score"])}' + (' (stalled)' if r['stalled'] else '') +
                  (f'; report seeds {_score(r["report"]["chosen"]["score"])}' if r.get('report') else '')) if r['chosen'] else ''
        lines.append(f'  round {r["round"]:>2} {r["status"]:<8} runs done {done}, failed {failed}, ' +
                     (f'stopped {stopped}, ' if stopped else '') + f'pending {points - done - failed - stopped}  {chosen}')
        lines += [f'      {run["name"]}: failed: {run["error"]}' for run in r['runs'] if run['status'] == 'failed']
        control = r.get('control')
        if control:
            lines.append(f'      control ({control["objective"]}, from {control["start"]["source"]}): ' +
                         (f'failed: {control["error"]}' if control['status'] == 'failed' else
                          f'chose {control["chosen"]["run"]} step {control["chosen"]["step"]}: {_score(control["chosen"]["score"])}') +
                         (f'; report seeds {_score(r["report"]["control"]["score"])}' if (r.get('report') or {}).get('control') else ''))
    running = manifest.read_json(os.path.join(workdir, RUNNING))
    if running and m['status'] == 'running':
        lines.append(f'  local job {running["job"]} is running or was interrupted (log: {os.path.join(workdir, running["log"])})')
    return lines


def cost_rows(m) -> list:
    """Per round: images seen by all its runs, by the chosen run alone, and cumulatively; MLE-image equivalents of
    everything the round ran (training, sampling, evaluation; `ddo_patch.rounds.sweep`), when it is done."""
    total, rows = 0, []
    for r in m['rounds']:
        seen = sum(run['images'] for run in r['runs'] + ([r['control']] if r.get('control') else []))
        total += seen
        chosen = next((run['images'] for run in r['runs'] if r['chosen'] and run['name'] == r['chosen']['run']), 0)
        rows.append(dict(round=r['round'], round_images=seen, chosen_images=chosen, cumulative_images=total,
                         mle_equivalents=(r.get('cost') or {}).get('mle_equivalents')))
    return rows


def table(m) -> str:
    pretraining = m['config']['pretraining_images']
    pct = (lambda n: f'{100 * n / pretraining:.3g}%') if pretraining else (lambda n: '-')
    names = sorted({run['name'] for r in m['rounds'] for run in r['runs']})
    reported = any(r.get('report') for r in m['rounds'])
    header = (['round', 'reference score'] + names + ['chosen', 'best', 'stalled'] +
              (['report: reference', 'report: chosen'] if reported else []) +
              ['images (round)', 'per run vs pretraining', 'cumulative vs pretraining', 'cost (MLE-image eq.)'])
    rows = []
    for r, cost in zip(m['rounds'], cost_rows(m)):
        by_name = {run['name']: run for run in r['runs']}
        cells = [('' if n not in by_name else 'failed' if by_name[n]['status'] == 'failed' else
                  'raced out' if not by_name[n]['best'] else _score(by_name[n]['best']['score']) +
                  (f' (stopped at {by_name[n]["stopped_at"]})' if by_name[n]['status'] == 'stopped' else '')) for n in names]
        report = r.get('report') or {}
        rows.append([str(r['round']), _score(r['reference_score'])] + cells +
                    [r['chosen']['run'] if r['chosen'] else '', _score(r['chosen']['score'] if r['chosen'] else None),
                     {True: 'yes', False: 'no'}.get(r.get('stalled'), '')] +
                    ([_score(report.get('reference', {}).get('score')), _score(report.get('chosen', {}).get('score'))]
                     if reported else []) +
                    [str(cost['round_images']), pct(cost['chosen_images']), pct(cost['cumulative_images']),
                     '-' if cost['mle_equivalents'] is None else f'{cost["mle_equivalents"]:.4g}'])
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)] + ['| ' + ' | '.join(row) + ' |' for row in rows]
    note = ('\nScores select on the evaluation seeds (a sweep point is chosen only if it beats the reference); '
            '"report" columns score the same snapshots on seeds that selected nothing.\n' if reported else '')
    return '\n'.join(lines) + '\n' + note + control_table(m) + stage_table(m) + race_text(m)


def stage_table(m) -> str:
    """Per round and stage: the modelled cost (MLE-image equivalents) beside the measured time: jobs, their seconds
    summed (each with its start-up) and the wall time from the first start to the last end."""
    rounds = [r for r in m['rounds'] if r.get('times') and 'stages' in (r.get('cost') or {})]
    if not rounds:
        return ''
    lines = ['', 'Cost and time per stage (modelled: MLE-image equivalents; measured: the jobs\' own wall seconds, '
                 'each including its start-up):', '',
             '| round | stage | cost (MLE-image eq.) | share | jobs | job seconds | wall seconds |', '|---|---|---|---|---|---|---|']
    for r in rounds:
        times = {t['stage']: t for t in r['times']}
        total = r['cost']['mle_equivalents']
        for stage, cost in r['cost']['stages'].items():
            t = times.get(stage, dict(jobs=0, job_seconds=0, wall_seconds=0))
            if cost or t['jobs']:
                lines.append(f'| {r["round"]} | {stage} | {cost:.4g} | {100 * cost / total:.0f}% | {t["jobs"]} | '
                             f'{t["job_seconds"]} | {t["wall_seconds"]:.0f} |')
        lines.append(f'| {r["round"]} | all | {total:.4g} | 100% | {sum(t["jobs"] for t in times.values())} | '
                     f'{sum(t["job_seconds"] for t in times.values())} | {sum(t["wall_seconds"] for t in times.values()):.0f} |')
    return '\n'.join(lines) + '\n'


def race_text(m) -> str:
    """With racing: per round, the samples each snapshot reached against scoring all of them in full, and why the
    stopped ones stopped."""
    rounds = [r for r in m['rounds'] if (r.get('race') or {}).get('snapshots')]
    if not rounds:
        return ''
    lines = ['', 'Racing (evaluate.policy = "racing"): samples per snapshot; a snapshot stops when the paired jackknife '
                 'gives it less than evaluate.race_threshold of beating the leader:', '']
    for r in rounds:
        entries = r['race']['snapshots']
        full = max(level['samples'] for level in r['race']['levels'])
        spent = sum(e['samples'] for e in entries.values())
        lines.append(f'- round {r["round"]}: {len(entries)} snapshots, {spent} samples against {len(entries) * full} in full '
                     f'({100 * spent / (len(entries) * full):.0f}%); '
                     f'{sum(e["status"] == "final" for e in entries.values())} scored in full')
        lines += [f'  - {path}: stopped at {e["samples"]} samples, {e["reason"]}' for path, e in sorted(entries.items())
                  if e['status'] == 'stopped']
    return '\n'.join(lines) + '\n'


def noise(m) -> dict | None:
    """The report metric's own noise: round 1's reference on the report seeds and on as many noise seeds."""
    report = (m['rounds'][0].get('report') or {}) if m['rounds'] else {}
    if 'reference_noise' not in report:
        return None
    a, b = report['reference']['score'], report['reference_noise']['score']
    return dict(report=a, noise=b, difference=abs(a - b))


def control_table(m) -> str:
    """DDO's choice against the matched control's, per round, on the selection and (when scored) the report seeds,
    with the report metric's noise."""
    rounds = [r for r in m['rounds'] if r.get('control') and r['chosen']]
    if not rounds:
        return ''
    start = "the round's reference" if m['config']['control']['start'] == 'reference' else "the previous round's control choice"
    lines = ['', f'DDO against the matched control ({m["config"]["control"]["objective"]}: the same runs with the MLE loss, '
                 f'each starting from {start}; never promoted):', '',
             '| round | DDO chosen | control chosen | DDO - control | report: DDO | report: control | report: DDO - control |',
             '|---|---|---|---|---|---|---|']
    for r in rounds:
        ddo, ctl, report = r['chosen']['score'], r['control']['chosen']['score'], r.get('report') or {}
        cells = [str(r['round']), f'{_score(ddo)} ({r["chosen"]["run"]})', f'{_score(ctl)} ({r["control"]["chosen"]["run"]})',
                 f'{ddo - ctl:+.4g}']
        if 'control' in report:
            cells += [_score(report['chosen']['score']), _score(report['control']['score']),
                      f'{report["chosen"]["score"] - report["control"]["score"]:+.4g}']
        else:
            cells += ['-', '-', '-']
        lines.append('| ' + ' | '.join(cells) + ' |')
    measured = noise(m)
    lines += ['', 'Lower is better; a negative difference is in DDO\'s favour. ' + (
        f'The report metric\'s own noise: the pretrained model scores {measured["report"]:.4g} on the report seeds and '
        f'{measured["noise"]:.4g} on as many other seeds (evaluate.noise_seeds), {measured["difference"]:.3g} apart.'
        if measured else 'Give evaluate.noise_seeds to measure the report metric\'s own noise beside it.'), '']
    return '\n'.join(lines)


def plot(m, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    done = [r for r in m['rounds'] if r['chosen']]
    for r in m['rounds']:
        scores = [run['best']['score'] for run in r['runs'] if run['best']]
        left.scatter([r['round']] * len(scores), scores, s=30, marker='x', color='0.4', zorder=3,
                     label='sweep points (best of each run)' if r is m['rounds'][0] else None)
    left.plot([r['round'] for r in done], [r['chosen']['score'] for r in done], 'o-', color='C0', label='best of round')
    if m['rounds'] and m['rounds'][0]['reference_score'] is not None:
        left.axhline(m['rounds'][0]['reference_score'], color='C3', ls='--', lw=1, label='pretrained')
    reported = [r for r in done if r.get('report')]
    if reported:
        left.plot([0] + [r['round'] for r in reported],
                  [reported[0]['report']['reference']['score']] + [r['report']['chosen']['score'] for r in reported],
                  's:', color='C2', label='report seeds (round 0: pretrained)')
    controlled = [r for r in done if r.get('control')]
    if controlled:
        left.plot([r['round'] for r in controlled], [r['control']['chosen']['score'] for r in controlled], 'D-', color='C1',
                  label='matched control (MLE), its choice')
        scored = [r for r in controlled if 'control' in (r.get('report') or {})]
        if scored:
            left.plot([r['round'] for r in scored], [r['report']['control']['score'] for r in scored], 'D:', color='C1', mfc='none',
                      label='matched control, report seeds')
    left.set(xlabel='round', ylabel=f'{m["metric"]} (lower is better)', title='metric per round')
    left.legend()
    costs = cost_rows(m)
    pretraining = m['config']['pretraining_images']
    scale, unit = (100 / pretraining, '% of pretraining images') if pretraining else (1e-6, 'million images')
    right.plot([c['round'] for c in costs], [c['cumulative_images'] * scale for c in costs], 'o-', label='all runs (the control\'s included)')
    right.plot([c['round'] for c in costs], [sum(x['chosen_images'] for x in costs[:i + 1]) * scale for i in range(len(costs))],
               's--', label='chosen runs only')
    right.set(xlabel='round', ylabel=unit, title='cost so far (images seen)')
    right.legend()
    for ax in (left, right):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.ticklabel_format(axis='y', useOffset=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def round_diagnostics(m, workdir, r) -> list:
    """The runs of round `r` that have a training log, as `diagnostics.plot` takes them: each sweep point and the
    control, read through the config's backend, its evaluations after the round's reference score (step 0); with
    racing only those scored on every selection seed (a score on fewer samples is biased: FID grows as n shrinks)."""
    backend = load_backend_class(m['config']['backend'])
    runs = []
    for run in r['runs'] + ([r['control']] if r.get('control') else []):
        run_dir = os.path.join(workdir, run['run_dir'])
        log = backend.training_log(run_dir) if os.path.isdir(run_dir) else []
        if not log:
            continue
        start = r['control']['start']['score'] if run['name'] == 'control' else r['reference_score']
        evaluations = ([dict(step=0, score=start)] if start is not None else []) + \
            [dict(step=e['step'], score=e['score']) for e in run['evaluations'] if e.get('status', 'final') == 'final']
        runs.append(dict(name=run['name'], beta=run['beta'], log=log, evaluations=evaluations,
                         flags=diagnostics.check(log, run['beta'], evaluations)))
    return runs


def diagnostics_text(rounds) -> str:
    """The flagged runs per round, one line each ('' when every run is in the healthy range)."""
    lines = [f'- round {number}, {run["name"]}: {flag.rule}: {flag.reason}'
             for number, runs in rounds for run in runs for flag in run['flags']]
    if not lines:
        return '\nDiagnostics: every run\'s DDO terms are in the healthy range (docs/diagnostics.md).\n'
    return '\nDiagnostics (docs/diagnostics.md):\n\n' + '\n'.join(lines) + '\n'


def report(workdir) -> tuple:
    """Write report.md, report.png and report-diagnostics-roundNN.png into the work directory; return (table text,
    [png paths])."""
    m = load(workdir)
    rounds = [(r['round'], round_diagnostics(m, workdir, r)) for r in m['rounds']]
    text = table(m) + diagnostics_text(rounds)
    with open(os.path.join(workdir, 'report.md'), 'w') as f:
        f.write(text)
    pngs = [os.path.join(workdir, 'report.png')]
    plot(m, pngs[0])
    for number, runs in rounds:
        if runs:
            pngs.append(os.path.join(workdir, f'report-diagnostics-round{number:02d}.png'))
            diagnostics.plot(runs, pngs[-1], m['step_unit'], m['metric'],
                             title=f'{os.path.basename(os.path.normpath(workdir))}: round {number}')
    return text, pngs
