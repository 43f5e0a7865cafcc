"""Does DDO improve a real image generator, beyond the finetune around it? The whole EDM2 route on scikit-learn's
UCI digits, on a CPU.

    pip install -e '.[digits]' && ddo-patch fetch edm2
    python benchmarks/digits.py --outdir runs/digits          # rerun the same command to resume after any stop

Stages, each cached in --outdir (a rerun skips what is done):
  1. data       `edm2_ext.digits`: train.zip (1497 scans), heldout.zip (300), the classifier and its statistics
  2. pretrain   a class-conditional EDM2 Precond by MLE with upstream's loop (`python -m edm2_ext.pretrain`, its
                1/sqrt decay and power EMA), a snapshot every 32Ki images; their FIDs are the pretraining curve
  3. rounds     `ddo-patch rounds run configs/digits-edm2.toml` once per training seed (1, 2, 3: the data order, the
                noise and the round's reference-sample seeds), two at a time: an alpha x beta grid, 3 rounds,
                selection on the selection seeds, and the config's [control], the matched control: each round the
                same run with upstream's MLE loss, from the previous round's control choice (a chain as long as
                DDO's), selected the same way
  4. continued  the pretraining run continued by MLE (its optimiser state and schedule) for as many images as DDO
                trained (the paper's control, figure 6), then on to as many MLE-image equivalents as the DDO rounds
                spent (training, reference samples, evaluations), its best snapshot by the selection seeds
  5. guidance   autoguidance (EDM2's rival, 2x network evaluations): the MLE model guided by its own early
                snapshot, at the weight of a small sweep that is best on the selection seeds
  6. report     every model on the report seeds, disjoint from all selection, sampled once (OUT/samples): against
                the training split FID, precision and recall (k-NN, k = 3) in the classifier's features and class
                consistency; against the 300 held-out images the same in 300-sample chunks (mean and spread);
                memorisation (`digits_report`)
  7. compare    DDO - control per round and training seed, paired on the report seeds (bootstrap / chunk standard
                errors), and over the seeds; the metric's own noise (two real halves, the MLE model on disjoint
                seed sets); digits.md, digits.json, digits.png

FID is biased upwards by about the feature dimension over the sample count, so only numbers at the same
count compare; the real-halves figure (two sets of 748) is larger than a model's on --report-seeds samples
for that reason alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import digits_report
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
                 seeds=[1, 2, 3], matched_every=32, config={}),
    'quick': dict(net=['--channels', '16', '--channel-mult', '1,2', '--blocks', '1'], batch=64, lr=1e-2, decay=0,
                  duration=8, snapshot=8, guide=None, guidance=[], steps=8, classifier_epochs=4, seeds=[1], matched_every=8,
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

    def score(self, images, labels, features=None) -> dict:
        """FID, precision and recall against the training split, and class consistency, of images [N, 3, H, W] (their
        features when already computed)."""
        features = self.detector(images).numpy() if features is None else features
        precision, recall = precision_recall(self.real, features)
        return dict(fid=frechet_distance(*feature_statistics(features), *self.real_stats), precision=precision,
                    recall=recall, class_consistency=class_consistency(self.detector.classify(images), labels))

    def evaluate(self, path, seeds, guide=None, guidance=1.0) -> dict:
        return self.score(self.images(path, seeds, guide, guidance), np.asarray(seeds) % digits.CLASSES)


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


def replicate_values(seed) -> dict:
    """The config edits of one replicate: its training seed (data order, noise, the control's too) and its own
    reference-sample seeds (round r of replicate s samples 1,000,000 + 100,000 s + 1000 (r - 1) onwards)."""
    return {'train.seed': str(seed), 'reference_samples.first_seed': str(1_000_000 + 100_000 * seed)}


def ddo_cost(manifest) -> float:
    """MLE-image equivalents the DDO rounds spent (every sweep point, evaluation and reference sample), not the control."""
    return sum(r['cost']['mle_equivalents'] - r['cost'].get('control_mle_equivalents', 0.0) for r in manifest['rounds'])


def control_models(out, manifest, pretrained, name):
    """[(round, path)]: each round's control choice in OUT/NAME (a chain: round r starts from round r - 1's)."""
    chain, previous = [], pretrained
    for record in manifest['rounds']:
        chosen = record['control']['chosen']
        previous = previous if chosen['run'] == 'start' else os.path.join(out, name, chosen['snapshot'])
        chain.append((record['round'], previous))
    return chain


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--outdir', required=True, help='Work directory; rerun the same command to resume.')
    parser.add_argument('--select-seeds', type=int, default=500, help='Samples that select (sweep points, snapshots, guidance weight).')
    parser.add_argument('--report-seeds', type=int, default=5000, help='Samples of each reported number (disjoint seeds).')
    parser.add_argument('--noise-sets', type=int, default=2, help='Disjoint report-size seed sets of the MLE model, the report seeds one of them (FID spread).')
    parser.add_argument('--size', choices=sorted(SIZES), default='full', help='full: the documented run; quick: the test suite\'s.')
    parser.add_argument('--pretrain-kimg', type=int, default=None, help='Pretraining length in Ki images (a multiple of 32).  [default: the size\'s]')
    parser.add_argument('--jobs', type=int, default=2, help='Replicates whose rounds run at once (one core each).')
    args = parser.parse_args()
    out, size = os.path.abspath(args.outdir), dict(SIZES[args.size])
    size['duration'] = args.pretrain_kimg or size['duration']
    size['config'] = dict(size['config'], pretraining_images=f'"{size["duration"]}Ki"')
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    select, report = seed_list(0, args.select_seeds), seed_list(100_000, args.report_seeds)

    log('1/7 data and classifier')
    if size['classifier_epochs']:
        digits.CLASSIFIER['epochs'] = size['classifier_epochs']
    classifier = digits.make_digits(os.path.join(out, 'data'))
    log(f'    classifier held-out accuracy {classifier["heldout_accuracy"]:.3f}')

    log(f'2/7 pretraining to {size["duration"]}Ki images (OUT/pretrain.log)')
    pretrained = mle(out, size, os.path.join(out, 'pretrain'), size['duration'], 'pretrain.log')
    ev, cache = Evaluator(out, size['steps']), Cache(os.path.join(out, 'scores.json'))
    curve = []
    for kimg in range(size['snapshot'], size['duration'] + 1, size['snapshot']):
        score = cache.get(f'pretrain {kimg} select {len(select)}', lambda k=kimg: ev.evaluate(snapshot(os.path.join(out, 'pretrain'), k), select))
        curve.append(dict(kimg=kimg, **score))
        log(f'    pretraining curve: {kimg}Ki images  FID {score["fid"]:.3f}')

    # Before the continued-MLE rows: their lengths are what the rounds trained and spent.
    log(f'3/7 DDO rounds with the matched control, training seeds {size["seeds"]} (OUT/rounds-s<seed>.log)')
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        runs = {seed: pool.submit(rounds, out, size, pretrained, f'0-{args.select_seeds - 1}', replicate_values(seed), f'rounds-s{seed}')
                for seed in size['seeds']}
        manifests = {seed: run.result() for seed, run in runs.items()}
    for seed, manifest in manifests.items():
        for record in manifest['rounds']:
            log(f'    seed {seed} round {record["round"]}: DDO chose {record["chosen"]["run"]} ({record["chosen"]["score"]:.3f}), '
                f'control {record["control"]["chosen"]["run"]} ({record["control"]["chosen"]["score"]:.3f})')
    first = manifests[size['seeds'][0]]
    trained = sum(max(run['images'] for run in record['runs']) for record in first['rounds']) // 1024
    spent = float(np.mean([ddo_cost(m) for m in manifests.values()]))
    matched = size['matched_every'] * math.ceil(spent / 1024 / size['matched_every'])

    log(f'4/7 continued MLE: {trained}Ki more images (as DDO trained), then to {matched}Ki more (as DDO spent: '
        f'{spent:.4g} MLE-image equivalents), OUT/continued.log')
    continued_dir = os.path.join(out, 'continued')
    if not os.path.isdir(continued_dir):
        shutil.copytree(os.path.join(out, 'pretrain'), continued_dir + '.partial')
        os.rename(continued_dir + '.partial', continued_dir)
    continued = mle(out, size, continued_dir, size['duration'] + trained, 'continued.log', math.gcd(size['duration'], trained))
    mle(out, size, continued_dir, size['duration'] + matched, 'continued.log', size['matched_every'])
    candidates = [snapshot(continued_dir, kimg) for kimg in range(size['duration'] + size['matched_every'],
                                                                  size['duration'] + matched + 1, size['matched_every'])]
    selection = {path: cache.get(f'{os.path.relpath(path, out)} 1 select {len(select)}', lambda p=path: ev.evaluate(p, select))['fid']
                 for path in candidates}
    compute_matched = min(candidates, key=lambda path: (selection[path], path))
    log('    compute-matched candidates (selection FID): ' + ', '.join(f'{os.path.basename(p)[17:24]} {v:.3f}' for p, v in selection.items()))

    models = {'MLE (round 0)': dict(path=pretrained), f'continued MLE (+{trained}Ki images)': dict(path=continued),
              f'continued MLE, compute-matched (+{matched}Ki, best by selection)': dict(path=compute_matched)}
    if size['guide']:
        log(f'5/7 autoguidance by the {size["guide"]}Ki snapshot, weights {size["guidance"]}')
        guide = snapshot(os.path.join(out, 'pretrain'), size['guide'])
        sweep = {w: cache.get(f'guidance {w} select {len(select)}', lambda w=w: ev.evaluate(pretrained, select, guide, w))['fid'] for w in size['guidance']}
        best = min(sweep, key=sweep.get)
        log(f'    selection FID by weight: {sweep}; best {best}')
        models[f'autoguidance w={best:g} (2x NFE)'] = dict(path=pretrained, guide=guide, guidance=best)
    baselines = list(models)
    for seed, manifest in manifests.items():
        for record, path, kept in chosen_models(out, manifest, pretrained, f'rounds-s{seed}'):
            models[f'DDO round {record["round"]} (seed {seed})'] = dict(path=path, kept=kept, run=record['chosen']['run'])
        for round_idx, path in control_models(out, manifest, pretrained, f'rounds-s{seed}'):
            models[f'control round {round_idx} (seed {seed})'] = dict(path=path)

    log(f'6/7 report: {len(models)} models on {len(report)} report seeds (samples cached in OUT/samples)')
    heldout_images, heldout_labels = digits.read_dataset(os.path.join(out, 'data', 'heldout.zip'))
    scorer = digits_report.Scorer(ev, heldout_images, heldout_labels)
    samples = {name: report_samples(out, ev, model, report) for name, model in models.items()}
    labels = np.asarray(report) % digits.CLASSES
    rows = []
    for name, model in models.items():
        score = cache.get(f'report {sample_key(out, model)} {len(report)}', lambda n=name: scorer.score(samples[n], labels))
        rows.append(dict(model=name, **score, kept=model.get('kept', False)))
        log(f'    {name}: FID {score["fid"]:.3f} (held-out {score["heldout"]["fid"]["mean"]:.2f}) precision {score["precision"]:.3f} '
            f'recall {score["recall"]:.3f} class consistency {score["class_consistency"]:.3f}')

    log('7/7 DDO against the matched control (paired), and the metric\'s noise')
    features = {name: ev.detector(torch_tensor(images)).numpy() for name, images in samples.items()}
    comparison = []
    for round_idx in range(1, len(first['rounds']) + 1):
        paired = [cache.get(f'paired {sample_key(out, models[f"DDO round {round_idx} (seed {seed})"])} '
                            f'{sample_key(out, models[f"control round {round_idx} (seed {seed})"])} {len(report)}',
                            lambda s=seed: scorer.paired(features[f'DDO round {round_idx} (seed {s})'],
                                                         features[f'control round {round_idx} (seed {s})'], seed=round_idx))
                  for seed in size['seeds']]
        comparison.append(dict(round=round_idx, fid=digits_report.across_seeds(paired, 'fid'),
                               heldout_fid=digits_report.across_seeds(paired, 'heldout_fid')))
        log(f'    round {round_idx}: FID DDO - control {comparison[-1]["fid"]["mean"]:+.3f} +- {comparison[-1]["fid"]["se"]:.3f} '
            f'(held-out {comparison[-1]["heldout_fid"]["mean"]:+.3f} +- {comparison[-1]["heldout_fid"]["se"]:.3f})')
    spread = [rows[0]['fid']] + [cache.get(f'noise {i} {len(report)}', lambda i=i: ev.evaluate(
        pretrained, seed_list(200_000 + i * len(report), len(report)))['fid']) for i in range(1, args.noise_sets)]
    noise = dict(real_noise(ev), mle_fid_over_seed_sets=spread, mle_fid_std=float(np.std(spread, ddof=1)) if len(spread) > 1 else None,
                 real_floor=scorer.floor())
    result = dict(classifier=classifier, pretraining_curve=curve, models=rows, noise=noise, comparison=comparison,
                  seeds=size['seeds'], rounds=len(first['rounds']), baselines=baselines, trained_kimg=trained,
                  ddo_cost_mle_equivalents=spent, compute_matched_kimg=matched, compute_matched_selection={
                      os.path.relpath(p, out): v for p, v in selection.items()},
                  select_samples=len(select), report_samples=len(report), size=args.size,
                  wall_seconds_this_invocation=time.time() - t0)   # a resumed run counts only what it did
    write_atomic(os.path.join(out, 'digits.json'), lambda f: f.write(json.dumps(result, indent=2).encode()))
    digits_report.write_markdown(out, result)
    last, seed = len(first['rounds']), size['seeds'][0]
    grids = {f'{name}, report seeds {report[0]}-{report[39]}': samples[name][:40] for name in
             ('MLE (round 0)', f'DDO round {last} (seed {seed})', f'control round {last} (seed {seed})')}
    digits_report.plot(os.path.join(out, 'digits.png'), result, grids)
    log(f'done in {time.time() - t0:.0f} s: {out}/digits.md, digits.json, digits.png')


def torch_tensor(array):
    import torch
    return torch.as_tensor(array)


def sample_key(out, model) -> str:
    return f'{os.path.relpath(model["path"], out)} {model.get("guidance", 1)}'


def report_samples(out, ev, model, seeds) -> np.ndarray:
    """A model's images on the report seeds (uint8 [N, 3, 8, 8]), sampled once and kept in OUT/samples."""
    path = os.path.join(out, 'samples', sample_key(out, model).replace('/', '_').replace(' ', '_') + f'_{len(seeds)}.npy')
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        images = ev.images(model['path'], seeds, model.get('guide'), model.get('guidance', 1.0)).numpy()
        write_atomic(path, lambda f: np.save(f, images))
    return np.load(path)


def stages_1_2(out) -> tuple:
    """Stages 1-2 for a benchmark that shares OUT (made when missing, reused when there): (the full size, its config
    naming the pretraining length, and the MLE model's path)."""
    size = dict(SIZES['full'])
    log('data and classifier; the MLE model (benchmarks/digits.py stages 1-2)')
    digits.make_digits(os.path.join(out, 'data'))
    pretrained = mle(out, size, os.path.join(out, 'pretrain'), size['duration'], 'pretrain.log')
    size['config'] = dict(size['config'], pretraining_images=f'"{size["duration"]}Ki"')
    return size, pretrained


def report_scorer(out, ev, cache, first, count):
    """score(path): the report row (digits_report.Scorer) of the model at `path` on `count` report seeds from `first`,
    its samples kept in OUT/samples and its scores in `cache`."""
    heldout_images, heldout_labels = digits.read_dataset(os.path.join(out, 'data', 'heldout.zip'))
    scorer = digits_report.Scorer(ev, heldout_images, heldout_labels)
    seeds = seed_list(first, count)
    labels = np.asarray(seeds) % digits.CLASSES

    def score(path):
        model = dict(path=path)
        return cache.get(f'report {sample_key(out, model)} {count}', lambda: scorer.score(report_samples(out, ev, model, seeds), labels))
    return score


def real_noise(ev) -> dict:
    """FID of two disjoint halves of the training features."""
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ev.real))
    a, b = ev.real[order[:len(order) // 2]], ev.real[order[len(order) // 2:len(order) // 2 * 2]]
    return dict(fid_real_halves=frechet_distance(*feature_statistics(a), *feature_statistics(b)), half_size=len(a))


if __name__ == '__main__':
    main()
