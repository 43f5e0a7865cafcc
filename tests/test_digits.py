"""The digits world (`edm2_ext.digits`): the fixed split, the data set writer, the classifier-feature detector;
and (marked upstream) a reduced run of `benchmarks/digits.py`'s pipeline asserting that DDO beats its reference."""

import json
import zipfile

import numpy as np
import pytest
import torch

from ddo_patch.errors import DDOPatchError

pytest.importorskip('sklearn', reason="the digits need scikit-learn (pip install -e '.[digits]')")

from edm2_ext import digits


def test_split_is_fixed_balanced_and_disjoint():
    """(0.1 s) 1497 training and 300 held-out scans, 30 of each class held out, the same on every call."""
    images, labels = digits.load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    train, heldout = digits.split(labels)
    assert len(train) == 1497 and len(heldout) == 300 and not set(train) & set(heldout)
    assert np.bincount(labels[heldout]).tolist() == [30] * 10
    again = digits.split(labels)
    assert np.array_equal(train, again[0]) and np.array_equal(heldout, again[1])


def test_dataset_writer_round_trips_in_edm2_layout(tmp_path):
    """(0.1 s) PNGs (grey replicated to RGB) plus dataset.json [[name, class], ...], read back exactly."""
    images, labels = digits.load_digits()
    path = tmp_path / 'd.zip'
    digits.write_dataset(path, images[:25], labels[:25])
    with zipfile.ZipFile(path) as z:
        entries = json.loads(z.read('dataset.json'))['labels']
        assert len(entries) == 25 and all(name.endswith('.png') and name in z.namelist() for name, _ in entries)
    read, read_labels = digits.read_dataset(path)
    assert read.shape == (25, 3, 8, 8) and read.dtype == torch.uint8
    assert torch.equal(read, torch.as_tensor(images[:25])[:, None].expand(-1, 3, -1, -1))
    assert read_labels.tolist() == labels[:25].tolist()


def test_classifier_training_is_deterministic_and_features_are_64_dim(tmp_path, monkeypatch):
    """(4 s; 11 s on the loaded machine) Two seeded runs give the same weights; the detector loads them from $DDO_DIGITS and says how to make them."""
    images, labels = digits.load_digits()
    x = torch.as_tensor(images[:200])[:, None].expand(-1, 3, -1, -1).contiguous()
    a = digits.train_classifier(x, labels[:200], epochs=2)
    b = digits.train_classifier(x, labels[:200], epochs=2)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    monkeypatch.delenv(digits.ENV, raising=False)
    with pytest.raises(DDOPatchError, match='set DDO_DIGITS'):
        digits.DigitsFeatures()
    monkeypatch.setenv(digits.ENV, str(tmp_path))
    with pytest.raises(DDOPatchError, match='run `python -m edm2_ext.digits'):
        digits.DigitsFeatures()
    torch.save(a.state_dict(), tmp_path / 'classifier.pt')
    detector = digits.DigitsFeatures()
    assert detector(x[:7]).shape == (7, digits.FEATURES) and detector.feature_dim == digits.FEATURES
    assert detector.classify(x[:7]).tolist() == digits.predict(a, x[:7]).tolist()


@pytest.mark.upstream
def test_upstream_reads_the_data_set(edm2_root, tmp_path):
    """(0.5 s) Upstream's ImageFolderDataset sees 3 channels at 8x8 and 10 classes, as EDM2's pixel route needs."""
    from ddo_patch import upstream
    upstream.activate('edm2', edm2_root)
    from training.dataset import ImageFolderDataset
    images, labels = digits.load_digits()
    digits.write_dataset(tmp_path / 'd.zip', images[:50], labels[:50])
    dataset = ImageFolderDataset(path=str(tmp_path / 'd.zip'), use_labels=True)
    assert (dataset.num_channels, dataset.resolution, dataset.label_dim, len(dataset)) == (3, 8, 10, 50)
    assert int(np.argmax(dataset[3][1])) == labels[3]


@pytest.mark.upstream
def test_reduced_benchmark_ddo_round_beats_its_reference(edm2_root, tmp_path):
    """(~100 s of CPU) `benchmarks/digits.py --size quick`: the same pipeline (data, classifier, upstream MLE pretraining,
    `ddo-patch rounds run` with one point, one round and the matched control, continued MLE as long as DDO trained and
    as long as it spent, every model against the training split and the held-out images, paired DDO - control) on an
    8Ki-image model. Deterministic (seeded, one thread). Measured: MLE FID 390.8 and 399.0 on two disjoint 200-sample
    seed sets, DDO round 1 317.5; this undertrained model still gains from any training (continued MLE 277.8; the
    compute-matched one far more), so the suite checks the direction against the MLE model and the pipeline's
    bookkeeping, the benchmark the comparison. The margin asserted is three times the MLE's spread over the two seed sets."""
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'digits.py')
    env = dict(os.environ, OMP_NUM_THREADS='1', EDM2_ROOT=str(edm2_root))
    proc = subprocess.run([sys.executable, script, '--outdir', str(tmp_path), '--size', 'quick', '--select-seeds', '200',
                           '--report-seeds', '600', '--noise-sets', '2'], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / 'digits.json').read_text())
    rows = {row['model'].split(' (')[0] if row['model'].startswith('MLE') else row['model']: row for row in result['models']}
    spread = abs(np.diff(result['noise']['mle_fid_over_seed_sets'])[0])
    print({name: round(row['fid'], 3) for name, row in rows.items()}, 'spread', round(spread, 3))
    assert rows['DDO round 1 (seed 1)']['fid'] < rows['MLE']['fid'] - 3 * spread, (rows, spread)
    assert not rows['DDO round 1 (seed 1)']['kept']
    # every row scored against the held-out images in two 300-sample chunks, and checked for memorisation
    assert all(row['heldout']['fid']['n'] == 2 and 0 <= row['memorisation']['closer_than_any_heldout'] <= 1 for row in rows.values())
    # the compute-matched continuation is as long as the DDO round's cost, in 8Ki steps, its snapshot the selection's best
    manifest = json.loads((tmp_path / 'rounds-s1' / 'manifest.json').read_text())
    cost = manifest['rounds'][0]['cost']
    assert result['compute_matched_kimg'] == 8 * -(-(cost['mle_equivalents'] - cost['control_mle_equivalents']) // (8 * 1024))
    assert min(result['compute_matched_selection'].values()) == pytest.approx(min(
        v['fid'] for k, v in json.loads((tmp_path / 'scores.json').read_text()).items() if k.startswith('continued/') and 'select' in k))
    comparison = result['comparison'][0]['fid']
    control = next(row for name, row in rows.items() if name.startswith('control round 1'))
    assert comparison['mean'] == pytest.approx(rows['DDO round 1 (seed 1)']['fid'] - control['fid']) and comparison['se'] > 0
    assert (tmp_path / 'digits.png').stat().st_size < 150_000
    assert '| DDO round 1 (seed 1) |' in (tmp_path / 'digits.md').read_text()
