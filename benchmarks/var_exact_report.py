"""The report of benchmarks/var_exact.py: the table of every model and scale, the paired differences, and the plot."""

from __future__ import annotations

import os

MEASURES = ('precision', 'recall', 'entropy', 'kl_model_data', 'kl_data_model')


def write_report(out, result):
    lines = ['| model | cfg | precision: teacher log-lik of samples | recall: NLL of held-out teacher samples | '
             'entropy of the sampler | KL(q \\|\\| p_data) | KL(p_data \\|\\| q) | sampling cost |', '|---|---|---|---|---|---|---|---|']
    for r in result['rows']:
        lines.append(f'| {r["model"]} | {r["cfg"]:g} | ' + ' | '.join(f'{r[m]["mean"]:.2f} +- {r[m]["se"]:.2f}' for m in MEASURES)
                     + f' | {"2x" if r["cfg"] else "1x"} |')
    lines += ['', f'{result["report_samples"]} samples per row, held-out NLL on the report half ({result["report_half"]} pyramids); '
              'nats per 30-token pyramid, mean +- standard error.', '',
              'Paired differences at cfg 0 (per sample on the same seeds and pyramids; over training seeds: mean, per-seed '
              'values, standard error of the mean = the larger of spread / sqrt(n) and the pooled sampling error):', '',
              '| difference | precision (higher better) | recall NLL (lower better) | KL(q \\|\\| p) (lower better) | '
              'KL(p \\|\\| q) (lower better) |', '|---|---|---|---|---|']
    for name, c in result['comparisons'].items():
        cells = []
        for m in ('precision', 'recall', 'kl_model_data', 'kl_data_model'):
            v = c[m]
            seeds = f' ({", ".join(f"{x:+.2f}" for x in v["per_seed"])})' if 'per_seed' in v and len(v['per_seed']) > 1 else ''
            cells.append(f'{v["mean"]:+.2f} +- {v["se"]:.2f}{seeds}')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    curve = result['mle_curve']
    if curve:
        lines += ['', 'MLE tuning-half NLL curve: ' + ', '.join(f'{p["step"]} {p["heldout"]["mean"]:.3f}' for p in curve) +
                  f' (training NLL at the end {curve[-1]["train"]["mean"]:.3f}).']
    with open(os.path.join(out, 'var_exact.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    plot(os.path.join(out, 'var_exact.png'), result)


def plot(path, result):
    """Precision and recall over cfg (the models evaluated at several scales), and precision against recall at cfg 0
    for every model and seed."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [r for r in result['rows'] if not r['model'].startswith('teacher')]
    teacher = next(r for r in result['rows'] if r['model'].startswith('teacher'))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), dpi=90)
    guided = [m for m in dict.fromkeys(r['model'] for r in rows) if sum(r['model'] == m for r in rows) > 1]
    for i, name in enumerate(guided):
        mine = [r for r in rows if r['model'] == name]
        for ax, measure in zip(axes[:2], ('precision', 'recall')):
            ax.errorbar([r['cfg'] for r in mine], [r[measure]['mean'] for r in mine], [r[measure]['se'] for r in mine],
                        marker='o', ms=3, color=f'C{i}', label=name)
    axes[0].axhline(teacher['precision']['mean'], color='k', ls=':', lw=1, label='teacher')
    axes[1].axhline(teacher['recall']['mean'], color='k', ls=':', lw=1, label='teacher (its entropy)')
    axes[0].set(xlabel='cfg', ylabel='teacher log-lik of samples (higher: precision)')
    axes[1].set(xlabel='cfg', ylabel='NLL of held-out teacher samples (lower: recall)')
    start = next(r['model'] for r in rows)
    gains = [(name.split(': ')[0] + ': ' + name.split(': ')[1].split(' - ')[0], c) for name, c in result['comparisons'].items()
             if name.endswith(f' - {start}')]
    for x, (name, c) in enumerate(gains):
        colour = 'C3' if ': DDO' in name else 'C0'
        for measure, offset, marker in (('precision', -0.12, 'o'), ('kl_model_data', 0.12, 's')):
            value = c[measure]
            axes[2].errorbar(x + offset, value['mean'], 3 * value['se'], marker=marker, color=colour, capsize=3, ms=5,
                             mfc='none' if measure == 'kl_model_data' else colour)
            axes[2].plot([x + offset] * len(value['per_seed']), value['per_seed'], '.', color='0.5', ms=4)
    axes[2].axhline(0, color='k', lw=0.8)
    axes[2].set_xticks(range(len(gains)))
    axes[2].set_xticklabels([name for name, _ in gains], rotation=30, ha='right', fontsize=6)
    axes[2].set(ylabel=f'paired difference from the {start}, cfg 0 (nats)')
    axes[2].set_title('against the start at cfg 0: precision (filled, higher better), KL(q || p) (open, lower better)\n'
                      'mean +- 3 SE over the seeds (grey); red: DDO, blue: its matched control', fontsize=7)
    for ax in axes[:2]:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
