"""Shared fixtures. Integration tests (marker `upstream`) find the upstream checkouts exactly as the entry
points do (`--edm2-root`/`EDM2_ROOT`/cache, likewise for VAR) and are skipped, with the reason printed
(`-rs`), when none is found: run `ddo-patch fetch edm2` / `ddo-patch fetch var` to enable them."""

import pytest

from ddo_patch import upstream
from ddo_patch.errors import DDOPatchError


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
    return _root_or_skip('var')
