"""The upstream locator and `ddo-patch fetch` on a throwaway git repository (no network)."""

import subprocess
import sys
import warnings

import pytest
from click.testing import CliRunner

from ddo_patch import upstream
from ddo_patch.cli import main
from ddo_patch.errors import DDOPatchError


def _git(*args, cwd):
    return subprocess.run(['git', *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def fake_edm2(tmp_path, monkeypatch):
    """A git repo that looks like an EDM2 checkout, with two commits; the pin is the first."""
    src = tmp_path / 'src'
    for marker in upstream.UPSTREAMS['edm2'].markers:
        (src / marker).parent.mkdir(parents=True, exist_ok=True)
        (src / marker).write_text('# stand-in\n')
    _git('init', '-q', cwd=src)
    _git('-c', 'user.name=t', '-c', 'user.email=t@t', 'add', '-A', cwd=src)
    _git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'pinned', cwd=src)
    pinned = _git('rev-parse', 'HEAD', cwd=src)
    (src / 'later.txt').write_text('x')
    _git('-c', 'user.name=t', '-c', 'user.email=t@t', 'add', '-A', cwd=src)
    _git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'later', cwd=src)
    pin = upstream.UPSTREAMS['edm2']
    monkeypatch.setitem(upstream.UPSTREAMS, 'edm2', upstream.Upstream(
        pin.name, pin.url, pinned, pin.env_var, pin.option, pin.markers))
    monkeypatch.setenv('DDO_PATCH_CACHE', str(tmp_path / 'cache'))
    monkeypatch.delenv('EDM2_ROOT', raising=False)
    return src, pinned


def test_fetch_checks_out_the_pin_and_locate_finds_it(fake_edm2, tmp_path):
    src, pinned = fake_edm2
    result = CliRunner().invoke(main, ['fetch', 'edm2', '--from', str(src)])
    assert result.exit_code == 0, result.output
    dest = tmp_path / 'cache' / 'edm2'
    assert upstream.git_commit(dest) == pinned and not (dest / 'later.txt').exists()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # at the pin: no warning
        assert upstream.locate('edm2') == dest.resolve()
    # A second fetch is a no-op; no stray temporary folders are left beside the checkout.
    assert CliRunner().invoke(main, ['fetch', 'edm2', '--from', str(src)]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / 'cache').iterdir()) == ['edm2']


def test_explicit_root_wins_and_other_commit_warns_with_both(fake_edm2, monkeypatch, tmp_path):
    src, pinned = fake_edm2
    monkeypatch.setenv('EDM2_ROOT', str(tmp_path / 'nowhere'))
    with pytest.warns(upstream.UpstreamCommitWarning) as record:
        assert upstream.locate('edm2', root=src) == src.resolve()  # src is at the later commit
    message = str(record[0].message)
    assert pinned in message and _git('rev-parse', 'HEAD', cwd=src) in message


def test_environment_pointing_at_a_non_checkout_names_the_variable(fake_edm2, monkeypatch, tmp_path):
    (tmp_path / 'empty').mkdir()
    monkeypatch.setenv('EDM2_ROOT', str(tmp_path / 'empty'))
    with pytest.raises(DDOPatchError, match=r'\$EDM2_ROOT .* not a checkout of edm2'):
        upstream.locate('edm2')


def test_missing_checkout_says_how_to_get_one(fake_edm2):
    result = CliRunner().invoke(main, ['where', 'edm2'])
    assert result.exit_code == 2
    assert 'ddo-patch fetch edm2' in result.output and len(result.output.strip().splitlines()) == 1


def test_failed_fetch_leaves_nothing_behind(fake_edm2, tmp_path):
    result = CliRunner().invoke(main, ['fetch', 'edm2', '--from', str(tmp_path / 'no-such-repo')])
    assert result.exit_code == 2 and 'failed' in result.output
    assert list((tmp_path / 'cache').iterdir()) == []


def test_activate_is_once_per_process(fake_edm2, monkeypatch, tmp_path):
    src, _ = fake_edm2
    monkeypatch.setattr(upstream, '_active', {})
    monkeypatch.setattr(sys, "path", list(sys.path))
    other = tmp_path / 'other'
    subprocess.run(['cp', '-r', str(src), str(other)], check=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', upstream.UpstreamCommitWarning)
        assert upstream.activate('edm2', src) == src.resolve()
        monkeypatch.setenv('EDM2_ROOT', str(other))
        assert upstream.activate('edm2') == src.resolve()   # no root: the active checkout, not the environment's
        with pytest.raises(DDOPatchError, match=f'edm2 is already imported from {src.resolve()}'):
            upstream.activate('edm2', other)
    assert sys.path.count(str(src.resolve())) == 1 and str(other.resolve()) not in sys.path
