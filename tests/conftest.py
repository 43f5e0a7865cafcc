"""Shared fixtures. Integration tests (marker `upstream`) find the upstream checkouts exactly as the entry
points do (`--edm2-root`/`EDM2_ROOT`/cache, likewise for VAR) and are skipped, with the reason printed
(`-rs`), when none is found: run `ddo-patch fetch edm2` / `ddo-patch fetch var` to enable them."""

import os
import socket

import pytest

from ddo_patch import upstream
from ddo_patch.errors import DDOPatchError

if os.environ.get('PYTEST_XDIST_WORKER'):
    # Two workers share two cores: in-process torch work takes one thread each, as the subprocesses do
    # (OMP_NUM_THREADS=1), instead of both oversubscribing the machine.
    import torch
    torch.set_num_threads(1)


def _root_or_skip(name):
    try:
        return upstream.locate(name)
    except DDOPatchError as err:
        pytest.skip(f'upstream {name} not available: {err}')


@pytest.fixture(scope='session')
def edm2_root():
    return _root_or_skip('edm2')


@pytest.fixture(scope='session')
def var_root():
    """The VAR checkout, activated in this process as var_ext's entry points do (upstream then imports plainly)."""
    from var_ext.models import activate_upstream
    return activate_upstream(_root_or_skip('var'))


@pytest.fixture
def free_port():
    """A TCP port nothing listens on now, for a process group's rendezvous (tests run side by side)."""
    with socket.socket() as s:
        s.bind(('', 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope='session')
def world(edm2_root, tmp_path_factory):
    """The tiny EDM2 world of `python -m edm2_ext.example` (8x8 data, an MLE snapshot, its statistics): the one
    pretrained tiny model of the session, for the round-manager and the integration tests; paths, and the
    environment their manager runs with."""
    from edm2_ext.example import make_example
    root = tmp_path_factory.mktemp('rounds-edm2')
    paths = make_example(str(root / 'tiny'), edm2_root)
    env = dict(os.environ, DDO_TINY=str(root / 'tiny'), EDM2_ROOT=str(edm2_root))
    return dict(root=root, env=env, **paths)
