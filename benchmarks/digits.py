"""Does DDO improve a real image generator? The whole EDM2 route on scikit-learn's UCI digits, on a CPU.

    pip install -e '.[digits]' && ddo-patch fetch edm2
    python benchmarks/digits.py --outdir runs/digits          # rerun the same command to resume after any stop

Stages, each cached in --outdir (a rerun skips what is done):
  1. data       `edm2_ext.digits`: train.zip (1497 scans), heldout.zip (300), the classifier and its statistics
  2. pretrain   a class-conditional EDM2 Precond by MLE with upstream's loop (`python -m edm2_ext.pretrain`), a
                snapshot every 32Ki images; the FID of each one is the pretraining curve (has it plateaued?)
  3. rounds     `ddo-patch rounds run configs/digits-edm2.toml` (alpha x beta grid, 3 rounds, selection seeds;
                the config's report seeds are dropped: stage 6 reports every model on the same seeds)
  4. continued  the same run continued by MLE for as many images as the chosen path trained in all rounds, with
                the same optimiser state and schedule (the paper's control, figure 6)
  5. guidance   autoguidance (EDM2's rival, 2x network evaluations): the final model guided by its own early
                snapshot, at the weight of a small sweep that is best on the selection seeds
  6. report     every model on the report seeds, disjoint from all selection: FID, precision and recall
                (k-NN, k = 3) in the classifier's features, class consistency; the metric's own noise (two real
                halves, the MLE model on disjoint seed sets); nearest-neighbour distances to the training images
                (memorisation); digits.md, digits.json, digits.png

FID is biased upwards by about the feature dimension over the sample count, so only numbers at the same
count compare; the real-halves figure (two sets of 748) is larger than a model's on --report-seeds samples
for that reason alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from ddo_patch import upstream
from ddo_patch.files import write_atomic
from ddo_patch.metrics import class_consistency, feature_statistics, frechet_distance, precision_recall
from edm2_ext import digits

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'digits-edm2.toml')
EMA = '0.100'
# Sizes: `full` is the documented run; `quick` is the suite's reduced run of the same pipeline (tests/test_digits.py).
SIZES = {
    'full': dict(net=['--channels', '16', '--channel-mult', '1,2', '--blocks', '2'], batch=128, lr=5e-3, decay=250,
                 duration=416, snapshot=32, guide=64, guidance=[1.25, 1.5, 2.0, 2.5, 3.0], steps=16, classifier_epochs=None,
                 config={}),
    'quick': dict(net=['--channels', '16', '--channel-mult', '1,2', '--blocks', '1'], batch=64, lr=1e-2, decay=0,
                  duration=8, snapshot=8, guide=None, guidance=[], steps=8, classifier_epochs=4,
                  config={'rounds': '1', 'run.duration': '"2Ki"', 'run.eval_every': '"2Ki"',
                          'sweep.alpha': '[0.5]', 'sweep.beta': '[0.05]', 'train.lr': '1e-3', 'train.checkpoint': '"2Ki"',
                          'evaluate.steps': '8', 'reference_samples.count': '500', 'reference_samples.steps': '16'}),
}


def log(message):
    print(f'[digits {time.strftime("%H:%M:%S")}] {message}', flush=True)


class Cache:
    """Scores by key in OUT/scores.json, written after each one, so a rerun evaluates nothing twice; merged with the
    file's current content on each write, so two benchmarks sharing an --outdir (digits.py, sweep_policies.py) keep
    each other's scores."""

    def __init__(self, path):
        self.path = path
        self.data = self._read()

    def _read(self) -> dict:
        if not os.path.isfile(self.path):
            return {}
        with open(self.path) as f:
            return json.load(f)

    def get(self, key, compute):
        if key not in self.data:
            self.data = dict(self._read(), **self.data)
        if key not in self.data:
            value = compute()
            self.data = dict(self._read(), **self.data, **{key: value})
            write_atomic(self.path, lambda f: f.write(json.dumps(self.data, indent=1).encode()))
        return self.data[key]


def edit_config(text, values) -> str:
    """The config with `section.key = value` lines replaced (top-level keys without a section), keys it lacks
    added at the end of their section; a value None removes the line."""
    lines, section, seen = [], '', set()

    def add_missing(section):
        lines.extend(f'{name.rpartition(".")[2]} = {value}' for name, value in values.items()
                     if value is not None and name not in seen and name.rpartition('.')[0] == section)

    for line in text.splitlines():
        header = re.match(r'\[(\w+)\]', line)
        if header:
            add_missing(section)
            section = header.group(1)
        key = re.match(r'(\w+)\s*=', line)
        name = f'{section}.{key.group(1)}' if key and section else (key.group(1) if key else None)
        seen.add(name)
        if name not in values:
            lines.append(line)
        elif values[name] is not None:
            lines.append(f'{key.group(1)} = {values[name]}')
    add_missing(section)
    return '\n'.join(lines) + '\n'


def subprocess_env(out):
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'), DDO_DIGITS=os.path.join(out, 'data'))


def run(args, out, log_name):
    """python ARGS, its output in OUT/LOG_NAME; raises with the tail on failure."""
    with open(os.path.join(out, log_name), 'a') as f:
        proc = subprocess.run([sys.executable] + args, cwd=out, env=subprocess_env(out), stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        sys.exit(f'{args[:2]} failed; see {os.path.join(out, log_name)}')


def snapshot(run_dir, kimg):
    return os.path.join(run_dir, f'network-snapshot-{kimg * 1024 // 1000:07d}-{EMA}.pkl')


def mle(out, size, run_dir, duration, log_name, every=None):
    """Upstream's MLE loop to `duration` Ki images, a snapshot every `every` Ki (resumes from the run's latest checkpoint)."""
    every = every or size['snapshot']
    if not os.path.isfile(snapshot(run_dir, duration)):
        run(['-m', 'edm2_ext.pretrain', '--data', os.path.join(out, 'data', 'train.zip'), '--outdir', run_dir] + size['net'] +
            ['--batch', str(size['batch']), '--lr', str(size['lr']), '--decay', str(size['decay']), '--rampup', '0.01',
             '--P_mean', '-0.8', '--P_std', '1.6', '--ema-std', EMA, '--snapshot', f'{every}Ki',
             '--checkpoint', f'{every}Ki', '--status', f'{every}Ki', '--workers', '0',
             '--duration', f'{duration}Ki'], out, log_name)
    return snapshot(run_dir, duration)


class Evaluator:
    """Samples a snapshot (optionally autoguided) at given seeds and scores them in the classifier's features."""

    def __init__(self, out, steps):
        upstream.activate('edm2')
        self.data = os.path.join(out, 'data')
        self.detector = digits.DigitsFeatures(self.data)
        train, self.train_labels = digits.read_dataset(os.path.join(self.data, 'train.zip'))
        self.train_pixels = train[:, 0].flatten(1).float().numpy()
        self.real = self.detector(train).numpy()
        self.real_stats = feature_statistics(self.real)
        self.steps = steps
        self._nets = {}

    def net(self, path):
        from edm2_ext.network import load_snapshot
        if path not in self._nets:
            self._nets[path] = load_snapshot(path)['ema'].eval().requires_grad_(False)
        return self._nets[path]

    def images(self, path, seeds, guide=None, guidance=1.0):
        import torch
        from edm2_ext.generate import sample_latents
        from training.encoders import StandardRGBEncoder
        kwargs = dict(gnet=self.net(guide), guidance=guidance) if guide else {}
        batches = [sample_latents(self.net(path), seeds[i:i + 250], torch.device('cpu'), num_steps=self.steps, **kwargs)
                   for i in range(0, len(seeds), 250)]
        return StandardRGBEncoder().decode(torch.cat(batches))

    def score(self, images, labels) -> dict:
        features = self.detector(images).numpy()
        precision, recall = precision_recall(self.real, features)
        return dict(fid=frechet_distance(*feature_statistics(features), *self.real_stats), precision=precision,
                    recall=recall, class_consistency=class_consistency(self.detector.classify(images), labels))

    def evaluate(self, path, seeds, guide=None, guidance=1.0) -> dict:
        return self.score(self.images(path, seeds, guide, guidance), np.asarray(seeds) % digits.CLASSES)

    def memorisation(self, path, seeds) -> dict:
        """Pixel distances to the nearest training image: of samples, and of held-out real images (the yardstick)."""
        import scipy.spatial
        tree = scipy.spatial.cKDTree(self.train_pixels)
        samples = self.images(path, seeds)[:, 0].flatten(1).float().numpy()
        heldout = digits.read_dataset(os.path.join(self.data, 'heldout.zip'))[0][:, 0].flatten(1).float().numpy()
        d_samples, d_heldout = tree.query(samples)[0], tree.query(heldout)[0]
        return dict(median_sample=float(np.median(d_samples)), median_heldout=float(np.median(d_heldout)),
                    closer_than_any_heldout=float(np.mean(d_samples < d_heldout.min())))


def real_noise(ev) -> dict:
    """FID of two disjoint halves of the training features, and of the held-out images, against the training split."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ev.real))
    a, b = ev.real[order[:len(order) // 2]], ev.real[order[len(order) // 2:len(order) // 2 * 2]]
    heldout, labels = digits.read_dataset(os.path.join(ev.data, 'heldout.zip'))
    return dict(fid_real_halves=frechet_distance(*feature_statistics(a), *feature_statistics(b)), half_size=len(a),
                heldout=ev.score(heldout, labels))


def rounds(out, size, pretrained, select, values=None, name='rounds'):
    """`ddo-patch rounds run` on configs/digits-edm2.toml with this run's seeds and sizes (and the config edits
    `values`) in OUT/NAME; the manifest."""
    values = dict(size['config'], **{'evaluate.seeds': f'"{select}"', 'evaluate.report_seeds': None}, **(values or {}))
    config = os.path.join(out, f'{name}.toml' if name != 'rounds' else 'digits-edm2.toml')
    with open(CONFIG) as f:
        text = edit_config(f.read(), values)
    previous = None
    if os.path.isfile(config):
        with open(config) as f:
            previous = f.read()
    if previous != text:   # a changed one (other seeds, sizes) the manager refuses for a work directory in progress
        write_atomic(config, lambda f: f.write(text.encode()))
    env = dict(subprocess_env(out), DDO_DIGITS_PRETRAINED=pretrained)
    with open(os.path.join(out, f'{name}.log'), 'a') as f:
        proc = subprocess.run([sys.executable, '-m', 'ddo_patch.cli', 'rounds', 'run', config, '--workdir', os.path.join(out, name)],
                              cwd=out, env=env, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        sys.exit(f'the round manager failed; see {os.path.join(out, name + ".log")}')
    with open(os.path.join(out, name, 'manifest.json')) as f:
        return json.load(f)


def chosen_models(out, manifest, pretrained, name='rounds'):
    """[(round record, path, kept)]: each round's chosen snapshot in OUT/NAME, or the reference it kept."""
    chain, previous = [], pretrained
    for record in manifest['rounds']:
        kept = record['chosen']['run'] == 'reference'
        previous = previous if kept else os.path.join(out, name, record['chosen']['snapshot'])
        chain.append((record, previous, kept))
    return chain


def seed_list(first, count):
    return list(range(first, first + count))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--outdir', required=True, help='Work directory; rerun the same command to resume.')
    parser.add_argument('--select-seeds', type=int, default=500, help='Samples that select (sweep points, snapshots, guidance weight).')
    parser.add_argument('--report-seeds', type=int, default=5000, help='Samples of each reported number (disjoint seeds).')
    parser.add_argument('--noise-sets', type=int, default=2, help='Disjoint report-size seed sets of the MLE model, the report seeds one of them (FID spread).')
    parser.add_argument('--size', choices=sorted(SIZES), default='full', help='full: the documented run; quick: the test suite\'s.')
    parser.add_argument('--pretrain-kimg', type=int, default=None, help='Pretraining length in Ki images (a multiple of 32).  [default: the size\'s]')
    args = parser.parse_args()
    out, size = os.path.abspath(args.outdir), dict(SIZES[args.size])
    size['duration'] = args.pretrain_kimg or size['duration']
    size['config'] = dict(size['config'], pretraining_images=f'"{size["duration"]}Ki"')
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    select, report = seed_list(0, args.select_seeds), seed_list(100_000, args.report_seeds)
    select_text = f'0-{args.select_seeds - 1}'

    log('1/6 data and classifier')
    if size['classifier_epochs']:
        digits.CLASSIFIER['epochs'] = size['classifier_epochs']
    classifier = digits.make_digits(os.path.join(out, 'data'))
    log(f'    classifier held-out accuracy {classifier["heldout_accuracy"]:.3f}')

    log(f'2/6 pretraining to {size["duration"]}Ki images (OUT/pretrain.log)')
    pretrained = mle(out, size, os.path.join(out, 'pretrain'), size['duration'], 'pretrain.log')
    ev, cache = Evaluator(out, size['steps']), Cache(os.path.join(out, 'scores.json'))
    curve = []
    for kimg in range(size['snapshot'], size['duration'] + 1, size['snapshot']):
        score = cache.get(f'pretrain {kimg} select {len(select)}', lambda k=kimg: ev.evaluate(snapshot(os.path.join(out, 'pretrain'), k), select))
        curve.append(dict(kimg=kimg, **score))
        log(f'    pretraining curve: {kimg}Ki images  FID {score["fid"]:.3f}')

    log('3/6 DDO rounds (OUT/rounds.log)')   # before the controls: the continued-MLE length is what the rounds trained
    manifest = rounds(out, size, pretrained, select_text)
    trained = sum(max(run['images'] for run in record['runs']) for record in manifest['rounds']) // 1024
    for record in manifest['rounds']:
        log(f'    round {record["round"]}: chosen {record["chosen"]["run"]}, score {record["chosen"]["score"]:.3f}')

    log(f'4/6 continued MLE: {trained}Ki more images (OUT/continued.log)')
    continued_dir = os.path.join(out, 'continued')
    if not os.path.isdir(continued_dir):
        shutil.copytree(os.path.join(out, 'pretrain'), continued_dir + '.partial')
        os.rename(continued_dir + '.partial', continued_dir)
    continued = mle(out, size, continued_dir, size['duration'] + trained, 'continued.log', math.gcd(size['duration'], trained))

    models = {'MLE (round 0)': dict(path=pretrained)}
    models['continued MLE'] = dict(path=continued)
    if size['guide']:
        log(f'5/6 autoguidance by the {size["guide"]}Ki snapshot, weights {size["guidance"]}')
        guide = snapshot(os.path.join(out, 'pretrain'), size['guide'])
        sweep = {w: cache.get(f'guidance {w} select {len(select)}', lambda w=w: ev.evaluate(pretrained, select, guide, w))['fid'] for w in size['guidance']}
        best = min(sweep, key=sweep.get)
        log(f'    selection FID by weight: {sweep}; best {best}')
        models[f'autoguidance w={best:g} (2x NFE)'] = dict(path=pretrained, guide=guide, guidance=best)
    for record, path, kept in chosen_models(out, manifest, pretrained):
        models[f'DDO round {record["round"]} ({record["chosen"]["run"]})'] = dict(path=path, kept=kept)

    log(f'6/6 report on {len(report)} report seeds')
    rows = []
    for name, model in models.items():
        score = cache.get(f'{os.path.relpath(model["path"], out)} {model.get("guidance", 1)} report {len(report)}',
                          lambda m=model: ev.evaluate(m['path'], report, m.get('guide'), m.get('guidance', 1.0)))
        rows.append(dict(model=name, **score, kept=model.get('kept', False)))
        log(f'    {name}: FID {score["fid"]:.3f} precision {score["precision"]:.3f} recall {score["recall"]:.3f} '
            f'class consistency {score["class_consistency"]:.3f}')
    spread = [rows[0]['fid']] + [cache.get(f'noise {i} {len(report)}', lambda i=i: ev.evaluate(
        pretrained, seed_list(200_000 + i * len(report), len(report)))['fid']) for i in range(1, args.noise_sets)]
    noise = dict(real_noise(ev), mle_fid_over_seed_sets=spread, mle_fid_std=float(np.std(spread, ddof=1)) if len(spread) > 1 else None)
    memorisation = cache.get('memorisation', lambda: ev.memorisation(pretrained, report[:1000]))
    result = dict(classifier=classifier, pretraining_curve=curve, models=rows, noise=noise, memorisation=memorisation,
                  select_samples=len(select), report_samples=len(report), size=args.size,
                  wall_seconds_this_invocation=time.time() - t0)   # a resumed run counts only what it did
    write_atomic(os.path.join(out, 'digits.json'), lambda f: f.write(json.dumps(result, indent=2).encode()))
    write_report(out, result, ev, models, report)
    log(f'done in {time.time() - t0:.0f} s: {out}/digits.md, digits.json, digits.png')


def write_report(out, result, ev, models, report):
    mle_row = result['models'][0]
    lines = [f'| model | FID ({result["report_samples"]} samples) | vs MLE | precision | recall | class consistency |',
             '|---|---|---|---|---|---|']
    for row in result['models']:
        lines.append(f'| {row["model"]}{" (kept its reference)" if row["kept"] else ""} | {row["fid"]:.3f} | '
                     f'{100 * (row["fid"] / mle_row["fid"] - 1):+.0f}% | {row["precision"]:.3f} | {row["recall"]:.3f} | '
                     f'{row["class_consistency"]:.3f} |')
    noise = result['noise']
    lines += ['', f'Noise: FID of two disjoint real halves ({noise["half_size"]} each) {noise["fid_real_halves"]:.3f}; '
              f'MLE FID over {len(noise["mle_fid_over_seed_sets"])} disjoint seed sets '
              f'{", ".join(f"{v:.3f}" for v in noise["mle_fid_over_seed_sets"])}'
              + (f' (std {noise["mle_fid_std"]:.3f})' if noise['mle_fid_std'] is not None else '') +
              f'; held-out real images FID {noise["heldout"]["fid"]:.3f} (300 images).',
              f'Pretraining curve (FID, {result["select_samples"]} selection samples): ' +
              ', '.join(f'{p["kimg"]}Ki {p["fid"]:.3f}' for p in result['pretraining_curve']) + '.']
    with open(os.path.join(out, 'digits.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    plot(os.path.join(out, 'digits.png'), result, ev, models, report)


def plot(path, result, ev, models, report):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = list(models)
    ddo = [n for n in names if n.startswith('DDO')]
    best = min(ddo, key=lambda n: next(r['fid'] for r in result['models'] if r['model'] == n)) if ddo else names[-1]
    seeds = report[:40]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6), dpi=90, gridspec_kw=dict(width_ratios=[1.4, 1.4, 1, 1]))
    for ax, name in zip(axes[:2], [names[0], best]):
        images = np.pad(ev.images(models[name]['path'], seeds)[:, 0].numpy(), ((0, 0), (1, 1), (1, 1)), constant_values=128)
        ax.imshow(images.reshape(4, 10, 10, 10).transpose(0, 2, 1, 3).reshape(40, 100), cmap='gray', interpolation='nearest')
        ax.set_title(f'{name}, report seeds {seeds[0]}-{seeds[-1]}', fontsize=8)
        ax.axis('off')
    curve = result['pretraining_curve']
    axes[2].plot([p['kimg'] for p in curve], [p['fid'] for p in curve], 'o-')
    axes[2].set(xlabel='pretraining Ki images', ylabel=f'FID ({result["select_samples"]} selection samples)')
    axes[2].set_title('MLE pretraining', fontsize=8)
    rows = {row['model']: row for row in result['models']}
    chain = [names[0]] + ddo
    axes[3].plot(range(len(chain)), [rows[n]['fid'] for n in chain], 'o-', color='C3', label='DDO (chosen per round)')
    for i, name in enumerate(n for n in names[1:] if n not in ddo):
        axes[3].axhline(rows[name]['fid'], color=f'C{i}', ls='--', lw=1, label=name)
    axes[3].set(xlabel='round (0 = MLE)', ylabel=f'FID ({result["report_samples"]} report samples)', xticks=range(len(chain)))
    axes[3].legend(fontsize=6)
    axes[3].set_title('metric per round', fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == '__main__':
    main()
