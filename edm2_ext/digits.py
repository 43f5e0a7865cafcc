"""Real images without a download: scikit-learn's UCI handwritten digits as an EDM2 data set, and a feature
detector for them (`pip install -e '.[digits]'`).

    python -m edm2_ext.digits DIR

    DIR/train.zip       1497 real 8x8 digit scans in EDM2's data set layout (PNGs + dataset.json labels)
    DIR/heldout.zip     the other 300 (30 per class), never trained on by anything
    DIR/classifier.pt   a small CNN trained on train.zip (seeded: the same weights on every run)
    DIR/classifier.json its held-out accuracy and how it was trained
    DIR/stats.pkl       {'fid': {mu, sigma}} of train.zip in the classifier's penultimate features,
                        upstream calculate_metrics' reference-statistics format

Every file is written once and reused (delete it to rebuild it). The split is fixed: a seeded permutation
within each class, the first 30 of each class held out.

The images are stored as 3-channel (grey replicated) PNGs although the scans are grey: EDM2's pixel
pipeline is RGB throughout (upstream's `StandardRGBEncoder` and its detectors, `calculate_metrics.Detector`:
"NCHW, uint8, 3 channels"; `edm2_ext.datasets` trains on 3 channels or 8 VAE moments, and `edm2_ext.generate`
writes RGB PNGs), so a 3-channel data set runs the whole route unchanged. The digits' 17 grey levels
(0-16) are scaled to 0-255.

`DigitsFeatures` is the FID detector of this domain, for `edm2_ext.evaluate --detector fid=edm2_ext.digits:DigitsFeatures`
and the round manager's `evaluate.detector`: the classifier's 64-dim penultimate layer. It loads the
classifier from `$DDO_DIGITS` (the DIR above), which the round manager's jobs inherit.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import click
import numpy as np
import torch

from ddo_patch.errors import DDOPatchError, exit_on_user_error
from ddo_patch.files import write_atomic

CLASSES, RESOLUTION, HELDOUT_PER_CLASS, SPLIT_SEED = 10, 8, 30, 0
FEATURES = 64
ENV = 'DDO_DIGITS'
# The classifier's training: Adam on the training split, random 1-pixel shifts (the scans are not centred alike).
CLASSIFIER = {'seed': 0, 'epochs': 40, 'batch': 64, 'lr': 2e-3}


def load_digits() -> tuple:
    """All 1797 scans as uint8 [N, 8, 8] (0-16 scaled to 0-255) and their labels [N]."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DDOPatchError("the digits need scikit-learn; pip install 'ddo-patch[digits]'") from None
    digits = sklearn_digits()
    return np.round(digits.images * (255 / 16)).astype(np.uint8), digits.target.astype(np.int64)


def split(labels) -> tuple:
    """(train indices, held-out indices): per class a seeded permutation, its first HELDOUT_PER_CLASS held out."""
    rng = np.random.RandomState(SPLIT_SEED)
    train, heldout = [], []
    for c in range(CLASSES):
        members = rng.permutation(np.flatnonzero(labels == c))
        heldout += members[:HELDOUT_PER_CLASS].tolist()
        train += members[HELDOUT_PER_CLASS:].tolist()
    return np.sort(train), np.sort(heldout)


def write_dataset(path, images, labels) -> None:
    """uint8 [N, H, W] grey images as an EDM2 data set zip: RGB PNGs and dataset.json {'labels': [[name, class]]}."""
    import PIL.Image

    def write(f):
        with zipfile.ZipFile(f, 'w', compression=zipfile.ZIP_STORED) as z:
            entries = []
            for i, (image, label) in enumerate(zip(images, labels)):
                name = f'{i // 1000:05d}/img{i:08d}.png'
                png = io.BytesIO()
                PIL.Image.fromarray(np.repeat(image[:, :, None], 3, axis=2), 'RGB').save(png, format='png')
                z.writestr(name, png.getvalue())
                entries.append([name, int(label)])
            z.writestr('dataset.json', json.dumps({'labels': entries}))
    write_atomic(path, write)


def read_dataset(path) -> tuple:
    """An EDM2 data set zip as uint8 NCHW images and int labels (the order of dataset.json)."""
    import PIL.Image
    with zipfile.ZipFile(path) as z:
        entries = json.loads(z.read('dataset.json'))['labels']
        images = [np.asarray(PIL.Image.open(io.BytesIO(z.read(name))).convert('RGB')) for name, _ in entries]
    return torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).contiguous(), np.array([c for _, c in entries])


class Classifier(torch.nn.Module):
    """Three 3x3 convolutions and a 64-unit layer (the features) before the 10-way output."""

    def __init__(self):
        super().__init__()
        act = torch.nn.SiLU
        self.trunk = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), act(), torch.nn.Conv2d(32, 64, 3, padding=1), act(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(64, 64, 3, padding=1), act(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
            torch.nn.Linear(64 * 4, FEATURES), act())
        self.head = torch.nn.Linear(FEATURES, CLASSES)

    def features(self, images):
        """uint8 NCHW (3 channels) -> [N, 64] float32."""
        return self.trunk(images.to(torch.float32) / 127.5 - 1)

    def forward(self, images):
        return self.head(self.features(images))


def _shifted(images, rng):
    """Each image moved by up to one pixel in x and y (zero fill)."""
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    dx, dy = rng.integers(0, 3, size=2)
    return padded[:, :, dy:dy + RESOLUTION, dx:dx + RESOLUTION]


def train_classifier(images, labels, seed=CLASSIFIER['seed'], epochs=CLASSIFIER['epochs'], batch=CLASSIFIER['batch'],
                     lr=CLASSIFIER['lr']) -> Classifier:
    """A seeded run of Adam with cross-entropy on uint8 NCHW images (deterministic on the CPU)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = Classifier()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    targets = torch.as_tensor(labels)
    for _ in range(epochs):
        order = torch.as_tensor(rng.permutation(len(images)))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = torch.nn.functional.cross_entropy(net(_shifted(images[idx], rng)), targets[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def predict(net, images) -> np.ndarray:
    return net(images).argmax(1).numpy()


def make_digits(directory) -> dict:
    """Write (or reuse) the data sets, the classifier and the reference statistics in `directory`; returns the
    classifier's record (held-out accuracy)."""
    from ddo_patch.metrics import feature_statistics
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, name) for name in ('train.zip', 'heldout.zip', 'classifier.pt', 'classifier.json', 'stats.pkl')}
    if not (os.path.isfile(paths['train.zip']) and os.path.isfile(paths['heldout.zip'])):
        images, labels = load_digits()
        train, heldout = split(labels)
        write_dataset(paths['heldout.zip'], images[heldout], labels[heldout])
        write_dataset(paths['train.zip'], images[train], labels[train])
    if not os.path.isfile(paths['classifier.json']):
        train_images, train_labels = read_dataset(paths['train.zip'])
        heldout_images, heldout_labels = read_dataset(paths['heldout.zip'])
        net = train_classifier(train_images, train_labels)
        write_atomic(paths['classifier.pt'], lambda f: torch.save(net.state_dict(), f))
        features = net.features(train_images).numpy()
        mu, sigma = feature_statistics(features)
        write_atomic(paths['stats.pkl'], lambda f: pickle.dump({'fid': dict(mu=mu, sigma=sigma)}, f))
        record = {'heldout_accuracy': float(np.mean(predict(net, heldout_images) == heldout_labels)),
                  'train_accuracy': float(np.mean(predict(net, train_images) == train_labels)),
                  'train_images': len(train_labels), 'heldout_images': len(heldout_labels), **CLASSIFIER}
        write_atomic(paths['classifier.json'], lambda f: f.write(json.dumps(record, indent=2).encode()))
    with open(paths['classifier.json']) as f:
        return json.load(f)


def load_classifier(directory=None) -> Classifier:
    """The classifier of `directory` (default $DDO_DIGITS), written by `python -m edm2_ext.digits DIR`."""
    directory = directory or os.environ.get(ENV)
    if not directory:
        raise DDOPatchError(f'set {ENV} to the folder written by `python -m edm2_ext.digits DIR` (it holds classifier.pt)')
    path = os.path.join(directory, 'classifier.pt')
    if not os.path.isfile(path):
        raise DDOPatchError(f'{path} does not exist; run `python -m edm2_ext.digits {directory}` first')
    net = Classifier()
    net.load_state_dict(torch.load(path, weights_only=True))
    return net.eval().requires_grad_(False)


class DigitsFeatures:
    """FID detector for the digits: uint8 NCHW (3 channels) -> the classifier's [N, 64] penultimate features."""
    feature_dim = FEATURES

    def __init__(self, directory=None):
        self.net = load_classifier(directory)

    @torch.no_grad()
    def __call__(self, images):
        return self.net.to(images.device).features(images)

    @torch.no_grad()
    def classify(self, images) -> np.ndarray:
        """The predicted class of each image."""
        return predict(self.net.to(images.device), images).astype(np.int64)


@click.command(context_settings={'help_option_names': ['-h', '--help']})
@click.argument('directory', metavar='DIR')
def cmdline(directory):
    """Write the UCI digits (train.zip, heldout.zip), a classifier and its feature statistics into DIR."""
    record = make_digits(directory)
    click.echo(f'digits in {directory}: {record["train_images"]} training and {record["heldout_images"]} held-out images; '
               f'classifier held-out accuracy {record["heldout_accuracy"]:.3f}\n'
               f'next: DDO_DIGITS={directory} python benchmarks/digits.py --outdir OUT')


if __name__ == '__main__':
    torch.set_num_threads(1)
    exit_on_user_error(cmdline)()
