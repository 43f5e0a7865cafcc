"""Scoring and reporting for benchmarks/digits.py: every reported model's samples on the report seeds, drawn once and
cached, then scored against the training split and against the 300 held-out images, checked for memorisation, and
compared with the matched control by paired differences.

- Against the training split (1497 images): FID, precision and recall (k-NN manifolds, k = 3) in the classifier's
  features, and class consistency, on all report samples.
- Against the held-out images (300, never trained on): the report samples in chunks of 300 (as many samples as real
  images, since FID and k-NN manifolds depend on both counts), each chunk's FID, precision and recall; the chunks'
  mean and standard deviation. The training split scored in 300-image chunks against the same held-out images is
  the floor: what real data of that count scores.
- Memorisation: the pixel distance of each of 1000 samples to its nearest training image (median), and the fraction
  of samples closer to a training image than the closest held-out image is to one.
- Paired differences (DDO - control, same report seeds and labels): on the training split, the standard error of
  the FID difference by a paired bootstrap over the report seeds; on the held-out images, the chunk-wise differences'
  mean and standard error.
"""

from __future__ import annotations

import os

import numpy as np

from ddo_patch.metrics import across_seeds as metrics_across_seeds
from ddo_patch.metrics import feature_statistics, frechet_distance, precision_recall

CHUNK = 300            # as many samples as held-out images
MEMORISATION = 1000    # samples checked against the training images
BOOTSTRAP = 200        # paired resamples of the report seeds


def fid(a, b) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


class Scorer:
    """The real sets in the classifier's features and pixels; scores of a model's cached report samples."""

    def __init__(self, ev, heldout_images, heldout_labels):
        import scipy.spatial
        self.ev = ev
        self.heldout = ev.detector(heldout_images).numpy()
        self.heldout_labels = np.asarray(heldout_labels)
        self.train_tree = scipy.spatial.cKDTree(ev.train_pixels)
        self.heldout_distances = self.train_tree.query(heldout_images[:, 0].flatten(1).float().numpy())[0]

    def chunks(self, features):
        return [features[i:i + CHUNK] for i in range(0, len(features) - CHUNK + 1, CHUNK)]

    def against_heldout(self, features) -> dict:
        """Per-chunk FID, precision and recall against the held-out images: {name: [value per chunk]}."""
        per_chunk = {'fid': [], 'precision': [], 'recall': []}
        for chunk in self.chunks(features):
            precision, recall = precision_recall(self.heldout, chunk)
            per_chunk['fid'].append(fid(chunk, self.heldout))
            per_chunk['precision'].append(precision)
            per_chunk['recall'].append(recall)
        return per_chunk

    def score(self, images, labels) -> dict:
        """Every number of a model's report row from its samples (uint8 [N, 3, H, W]) and their labels: the evaluator's
        scores against the training split, then against the held-out images, then memorisation."""
        import torch
        images_t = torch.as_tensor(images)
        features = self.ev.detector(images_t).numpy()
        distances = self.train_tree.query(images[:MEMORISATION, 0].reshape(min(len(images), MEMORISATION), -1).astype(np.float32))[0]
        return dict(self.ev.score(images_t, labels, features),
                    heldout={k: summary(v) for k, v in self.against_heldout(features).items()},
                    memorisation=dict(median_sample=float(np.median(distances)),
                                      closer_than_any_heldout=float(np.mean(distances < self.heldout_distances.min()))))

    def floor(self) -> dict:
        """The training split in 300-image chunks against the held-out images, and the held-out images' own
        distances to the training images: what real data scores."""
        return dict(heldout={k: summary(v) for k, v in self.against_heldout(self.ev.real).items()},
                    memorisation=dict(median_heldout=float(np.median(self.heldout_distances))))

    def paired(self, features_a, features_b, seed=0) -> dict:
        """a - b on the same report seeds: the FID difference against the training split with its paired-bootstrap
        standard error, and the chunk-wise FID difference against the held-out images with its standard error."""
        rng = np.random.default_rng(seed)
        draws = [rng.integers(0, len(features_a), len(features_a)) for _ in range(BOOTSTRAP)]
        boot = [fid(features_a[i], self.ev.real) - fid(features_b[i], self.ev.real) for i in draws]
        chunks = np.subtract(self.against_heldout(features_a)['fid'], self.against_heldout(features_b)['fid'])
        return dict(fid=fid(features_a, self.ev.real) - fid(features_b, self.ev.real), fid_se=float(np.std(boot, ddof=1)),
                    heldout_fid=float(chunks.mean()), heldout_fid_se=float(chunks.std(ddof=1) / len(chunks) ** 0.5))


def summary(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return dict(mean=float(values.mean()), std=float(values.std(ddof=1)) if len(values) > 1 else 0.0, n=len(values))


def across_seeds(differences, key) -> dict:
    """`ddo_patch.metrics.across_seeds` of the per-seed paired differences `key` (DDO - control; lower is better), and
    whether DDO is ahead by more than three standard errors."""
    summary = metrics_across_seeds([d[key] for d in differences], [d[f'{key}_se'] for d in differences])
    return dict(summary, beats_by_3_se=bool(summary['mean'] + 3 * summary['se'] < 0))


def write_markdown(out, result) -> None:
    rows, noise = result['models'], result['noise']
    lines = [f'| model | FID vs training ({result["report_samples"]}) | precision | recall | class consistency | '
             f'FID vs held-out ({CHUNK}-sample chunks) | precision / recall vs held-out | nearest training image '
             '(median px) | closer than any held-out |', '|---|---|---|---|---|---|---|---|---|']
    for row in rows:
        h, m = row['heldout'], row['memorisation']
        lines.append(f'| {row["model"]} | {row["fid"]:.3f} | {row["precision"]:.3f} | {row["recall"]:.3f} | '
                     f'{row["class_consistency"]:.3f} | {h["fid"]["mean"]:.2f} +- {h["fid"]["std"]:.2f} | '
                     f'{h["precision"]["mean"]:.3f} / {h["recall"]["mean"]:.3f} | {m["median_sample"]:.0f} | '
                     f'{m["closer_than_any_heldout"]:.3f} |')
    floor = noise['real_floor']
    lines += ['', f'Real data: the training split in {CHUNK}-image chunks against the held-out images: FID '
              f'{floor["heldout"]["fid"]["mean"]:.2f} +- {floor["heldout"]["fid"]["std"]:.2f}, precision / recall '
              f'{floor["heldout"]["precision"]["mean"]:.3f} / {floor["heldout"]["recall"]["mean"]:.3f}; held-out images\' '
              f'median distance to the nearest training image {floor["memorisation"]["median_heldout"]:.0f}. '
              f'Two disjoint halves of the training split: FID {noise["fid_real_halves"]:.3f}. MLE FID on disjoint '
              f'{result["report_samples"]}-sample seed sets: {", ".join(f"{v:.3f}" for v in noise["mle_fid_over_seed_sets"])}.', '',
              'DDO against the matched control (the same rounds with the MLE loss), paired on the report seeds, per '
              'round: mean over training seeds, the per-seed values, and the standard error of the mean (the larger '
              'of the seeds\' spread and the pooled paired sampling error; negative: DDO better):', '',
              '| round | FID vs training: DDO - control | per seed | SE | beats by 3 SE | FID vs held-out: DDO - control | '
              'per seed | SE | beats by 3 SE |', '|---|---|---|---|---|---|---|---|---|']
    for r in result['comparison']:
        t, h = r['fid'], r['heldout_fid']
        lines.append(f'| {r["round"]} | {t["mean"]:+.3f} | {", ".join(f"{v:+.2f}" for v in t["per_seed"])} | {t["se"]:.3f} | '
                     f'{t["beats_by_3_se"]} | {h["mean"]:+.3f} | {", ".join(f"{v:+.2f}" for v in h["per_seed"])} | '
                     f'{h["se"]:.3f} | {h["beats_by_3_se"]} |')
    lines += ['', 'Pretraining curve (FID, selection samples): ' +
              ', '.join(f'{p["kimg"]}Ki {p["fid"]:.3f}' for p in result['pretraining_curve']) + '.']
    with open(os.path.join(out, 'digits.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def plot(path, result, grids) -> None:
    """Sample grids (MLE, DDO's and the control's last round at one seed); the pretraining curve; FID per round against
    the training split and against the held-out images (chunk mean and its standard error), every training seed a line,
    the other models as levels."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = {row['model']: row for row in result['models']}
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5), dpi=80)
    for ax, (name, images) in zip(axes[0], grids.items()):
        padded = np.pad(images[:, 0], ((0, 0), (1, 1), (1, 1)), constant_values=128)
        ax.imshow(padded.reshape(4, 10, 10, 10).transpose(0, 2, 1, 3).reshape(40, 100), cmap='gray', interpolation='nearest')
        ax.set_title(name, fontsize=8)
        ax.axis('off')
    curve = result['pretraining_curve']
    axes[1, 0].plot([p['kimg'] for p in curve], [p['fid'] for p in curve], 'o-', ms=3)
    axes[1, 0].set(xlabel='pretraining Ki images', ylabel=f'FID ({result["select_samples"]} selection samples)', yscale='log')
    axes[1, 0].set_title('MLE pretraining (EDM2\'s 1/sqrt decay, power EMA)', fontsize=8)
    mle = rows[result['baselines'][0]]
    for ax, value, where in ((axes[1, 1], lambda r: (r['fid'], 0), 'training split'),
                             (axes[1, 2], lambda r: (r['heldout']['fid']['mean'], r['heldout']['fid']['std'] / r['heldout']['fid']['n'] ** 0.5),
                              f'held-out images ({CHUNK}-sample chunks, mean +- SE)')):
        for arm, color in (('DDO', 'C3'), ('control', 'C0')):
            for i, seed in enumerate(result['seeds']):
                points = [value(mle)] + [value(rows[f'{arm} round {r} (seed {seed})']) for r in range(1, result['rounds'] + 1)]
                ax.errorbar(range(len(points)), [p[0] for p in points], [p[1] for p in points], marker='o', ms=3, color=color,
                            alpha=0.8, capsize=2, label=f'{arm} (seeds {", ".join(map(str, result["seeds"]))})' if i == 0 else None)
        for i, name in enumerate(result['baselines'][1:]):
            ax.axhline(value(rows[name])[0], color=f'C{i + 4}', ls='--', lw=1, label=name)
        ax.set(xlabel='round (0 = MLE)', ylabel='FID', xticks=range(result['rounds'] + 1))
        ax.set_title(f'FID vs the {where}', fontsize=8)
        ax.legend(fontsize=6, loc='center right')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
