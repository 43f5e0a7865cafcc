"""Unit tests (no upstream needed) for the EDM2 presets and the command-line size/seed parsing."""

import math

import pytest

from ddo_patch.errors import DDOPatchError
from ddo_patch.sizes import parse_nimg
from ddo_patch.seeds import parse_seeds
from edm2_ext.presets import PRESETS, resolve


def test_img64_rounds_follow_appendix_c():
    first, last16, first_late, last = (resolve('ddo-img64-s', r) for r in (1, 16, 17, 24))
    assert (first['batch'], first['P_mean'], first['decay'], first['rampup'], first['ema_std']) == (512, -0.8, 2000, 1.0, 0.05)
    assert (first['P_std'], first['lr']) == (1.6, 5e-5) == (last16['P_std'], last16['lr'])
    assert (first_late['P_std'], first_late['lr']) == (3.0, 2e-5) == (last['P_std'], last['lr'])
    assert first['snapshot'] == 1 << 17


def test_img512_rounds_follow_appendix_c():
    by_round = {r: resolve('ddo-img512-l', r) for r in range(1, 29)}
    assert [by_round[r]['P_std'] for r in (1, 17, 18, 21, 22, 28)] == [1.6, 1.6, 2.0, 2.0, 3.0, 3.0]
    assert [by_round[r]['lr'] for r in (1, 24, 25, 28)] == [1e-4, 1e-4, 5e-5, 5e-5]
    assert (by_round[1]['batch'], by_round[1]['P_mean'], by_round[1]['decay'], by_round[1]['snapshot']) == (2048, -0.4, 800, 1 << 18)


@pytest.mark.parametrize('preset', sorted(PRESETS))
def test_presets_satisfy_upstream_interval_rules(preset):
    hp = resolve(preset)
    assert math.isclose(hp['duration'], 6.4e6, rel_tol=0.03)  # 6.4M images per round
    for nimg in (hp['duration'], hp['snapshot'], hp['checkpoint'], hp['status']):
        assert nimg % hp['batch'] == 0
    assert hp['snapshot'] % 1024 == 0 and hp['checkpoint'] % 1024 == 0
    assert hp['duration'] % hp['snapshot'] == 0  # the last step is an evaluation point


def test_overrides_win_over_preset_and_round():
    hp = resolve('ddo-img64-s', 20, P_std=2.5, lr=None)
    assert hp['P_std'] == 2.5 and hp['lr'] == 2e-5


@pytest.mark.parametrize('preset, round_idx', [('nope', 1), ('ddo-img64-s', 25), ('ddo-img64-s', 0)])
def test_bad_preset_or_round_is_a_user_error(preset, round_idx):
    with pytest.raises(DDOPatchError):
        resolve(preset, round_idx)


@pytest.mark.parametrize('text, value', [('512', 512), ('128Ki', 128 << 10), ('8Mi', 8 << 20), ('1Gi', 1 << 30), (7, 7)])
def test_parse_nimg(text, value):
    assert parse_nimg(text) == value


@pytest.mark.parametrize('text', ['8M', 'Ki', '-1', '1.5Mi'])
def test_parse_nimg_rejects(text):
    with pytest.raises(DDOPatchError):
        parse_nimg(text)


def test_parse_seeds():
    assert parse_seeds('0-4') == [0, 1, 2, 3, 4]
    assert parse_seeds('7,1,3-4') == [7, 1, 3, 4]
    assert len(parse_seeds('0-49999')) == 50000
    for bad in ('5-1', 'a', '1-2-3', ''):
        with pytest.raises(DDOPatchError):
            parse_seeds(bad)
