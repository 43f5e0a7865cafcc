"""Loading EDM2 snapshots, and the network that DDO trains.

Import after `ddo_patch.upstream.activate('edm2')`: snapshots unpickle into upstream classes.
"""

from __future__ import annotations

import copy
import pickle

import torch

import dnnlib
from ddo_patch.errors import DDOPatchError


def load_snapshot(path: str) -> dict:
    """An EDM2 snapshot pickle (path or URL) as a dict with at least `ema`, or a one-line error."""
    try:
        with dnnlib.util.open_url(path, verbose=False) as f:
            data = pickle.load(f)
    except FileNotFoundError:
        raise DDOPatchError(f'{path} does not exist; give an EDM2 network snapshot (.pkl) or its URL') from None
    except Exception as err:  # anything pickle or the download can raise means "not a snapshot we can read"
        raise DDOPatchError(f'{path} is not an EDM2 network snapshot ({type(err).__name__}: {err}); '
                            f'give a network-snapshot-*.pkl written by EDM2 or edm2_ext.train') from None
    net = data.get('ema') if isinstance(data, dict) else None
    if not isinstance(net, torch.nn.Module) or not all(hasattr(net, a) for a in ('img_resolution', 'img_channels', 'label_dim')):
        raise DDOPatchError(f'{path} is not an EDM2 network snapshot (no `ema` denoiser network in it); '
                            f'give a network-snapshot-*.pkl written by EDM2 or edm2_ext.train')
    return data


def fp32_without_dropout(net: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy with dropout off, as DDO trains (appendix C); call it with `force_fp32=True`.

    Official snapshots store the EMA network in fp16; the copy is the fp16-rounded model upcast, so the
    trained and the reference network start out identical. Its `use_fp16` stays the snapshot's: it is how
    upstream samples a snapshot (fp16 on a GPU), and the snapshots DDO writes (copies of this network)
    must sample as the official ones do, in the next round's reference samples, every FID evaluation and
    the user's `generate_images.py`. Training passes `force_fp32=True` instead (`edm2_ext.loss`).
    """
    net = copy.deepcopy(net).to(torch.float32)
    for module in net.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, 'dropout', None), float):  # EDM2's Block keeps a float probability
            module.dropout = 0.0
    return net


def interface(net) -> tuple:
    """(resolution, channels, label_dim) of a denoiser in its final (latent) space."""
    return int(net.img_resolution), int(net.img_channels), int(net.label_dim)


def ddo_network(ref: str, img_resolution: int, img_channels: int, label_dim: int, **unused_kwargs) -> torch.nn.Module:
    """`network_kwargs` target for upstream's training loop: the `--ref` snapshot's EMA net, fp32, dropout off.

    Upstream passes the data set's interface; it must match the network's.
    """
    net = load_snapshot(ref)['ema']
    if interface(net) != (img_resolution, img_channels, label_dim):
        raise DDOPatchError(f'--ref network expects (resolution, channels, label_dim) = {interface(net)}, but --data '
                            f'gives {(img_resolution, img_channels, label_dim)}; use the data the network was trained on')
    return fp32_without_dropout(net)
