"""Locating, fetching and pinning the upstream checkouts (NVlabs/edm2, FoundationVision/VAR).

Resolution order (docs/design.md): an explicit root (`--edm2-root`, `--var-root`), then the environment
(`EDM2_ROOT`, `VAR_ROOT`), then the cache filled by `ddo-patch fetch edm2|var`. Upstream code is never
copied into this project; `activate()` puts the checkout on `sys.path` so its top-level modules
(`training`, `dnnlib`, `torch_utils` / `models`, `utils`, `trainer`, `dist`) import as upstream intends.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from ddo_patch.errors import DDOPatchError


@dataclasses.dataclass(frozen=True)
class Upstream:
    name: str           # 'edm2' or 'var'
    url: str            # where `ddo-patch fetch` clones from by default
    commit: str         # the pinned commit every adapter and patch is written against
    env_var: str        # environment variable naming a checkout
    option: str         # command-line option naming a checkout
    markers: tuple      # files whose presence identifies a checkout of this upstream


UPSTREAMS = {
    'edm2': Upstream('edm2', 'https://github.com/NVlabs/edm2.git', '4bf8162f601bcc09472ce8a32dd0cbe8889dc8fc',
                     'EDM2_ROOT', '--edm2-root', ('train_edm2.py', 'training/training_loop.py', 'torch_utils/persistence.py')),
    'var': Upstream('var', 'https://github.com/FoundationVision/VAR.git', '78b95394fc5896192e3a003e4b295f8ea743c48f',
                    'VAR_ROOT', '--var-root', ('trainer.py', 'models/var.py', 'utils/arg_util.py')),
}


class UpstreamCommitWarning(UserWarning):
    """The checkout is not at the commit ddo-patch was written and tested against."""


def get_upstream(name: str) -> Upstream:
    if name not in UPSTREAMS:
        raise DDOPatchError(f'unknown upstream "{name}"; choose one of {", ".join(UPSTREAMS)}')
    return UPSTREAMS[name]


def cache_root() -> Path:
    """`$DDO_PATCH_CACHE`, else `$XDG_CACHE_HOME/ddo-patch`, else `~/.cache/ddo-patch`."""
    if os.environ.get('DDO_PATCH_CACHE'):
        return Path(os.environ['DDO_PATCH_CACHE']).expanduser()
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(base) / 'ddo-patch'


def cached_checkout(name: str) -> Path:
    return cache_root() / get_upstream(name).name


def is_checkout(name: str, path: Path) -> bool:
    return all((Path(path) / marker).is_file() for marker in get_upstream(name).markers)


def git_commit(path: Path) -> Optional[str]:
    """The HEAD commit of a git checkout, or None for a plain copy (or no git)."""
    try:
        out = subprocess.run(['git', '-C', str(path), 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def locate(name: str, root: Optional[str | os.PathLike] = None, check_commit: bool = True) -> Path:
    """Find the checkout of `name`, or raise a one-line error saying how to get one."""
    up = get_upstream(name)
    if root is not None:
        candidate, origin = Path(root), up.option
    elif os.environ.get(up.env_var):
        candidate, origin = Path(os.environ[up.env_var]), f'${up.env_var}'
    else:
        candidate, origin = cached_checkout(name), None
        if not is_checkout(name, candidate):
            raise DDOPatchError(f'no {name} checkout found; run `ddo-patch fetch {name}` (or pass {up.option} / '
                                f'set {up.env_var} to a clone of {up.url} at {up.commit[:12]})')
    candidate = candidate.expanduser().resolve()
    if not is_checkout(name, candidate):
        raise DDOPatchError(f'{origin} points to {candidate}, which is not a checkout of {name} (missing '
                            f'{", ".join(m for m in up.markers if not (candidate / m).is_file())}); '
                            f'point it at a clone of {up.url}')
    if check_commit:
        commit = git_commit(candidate)
        if commit is not None and commit != up.commit:
            warnings.warn(f'{name} checkout {candidate} is at commit {commit}, but ddo-patch is pinned to {up.commit}; '
                          f'run `git -C {candidate} checkout {up.commit}` if anything breaks', UpstreamCommitWarning, stacklevel=2)
    return candidate


_active: dict = {}   # upstream name -> the checkout this process imports it from


def activate(name: str, root: Optional[str | os.PathLike] = None) -> Path:
    """Locate the checkout and make its top-level modules importable, once per process.

    Entry points call it with their --edm2-root/--var-root; a later call without a root gets the same checkout,
    and one naming another checkout is refused, since upstream's modules are already imported from the first.
    """
    if root is None and name in _active:
        return _active[name]
    path = locate(name, root)
    active = _active.setdefault(name, path)
    if active != path:
        raise DDOPatchError(f'{name} is already imported from {active} in this process; {path} cannot replace it '
                            f'(give one {get_upstream(name).option} per process)')
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path


def fetch(name: str, source: Optional[str] = None, dest: Optional[str | os.PathLike] = None) -> Path:
    """Clone `source` (default: the GitHub URL) into the cache and check out the pinned commit.

    The clone is made beside the destination and renamed into place, so an interrupted fetch never
    leaves a half-made checkout behind. An existing checkout at the pin is kept as is.
    """
    up = get_upstream(name)
    dest = Path(dest) if dest is not None else cached_checkout(name)
    if is_checkout(name, dest) and git_commit(dest) == up.commit:
        return dest
    if dest.exists():
        raise DDOPatchError(f'{dest} exists but is not a {name} checkout at {up.commit[:12]}; remove it and fetch again')
    if shutil.which('git') is None:
        raise DDOPatchError('`git` is not installed; install git, or download the upstream and set ' + up.env_var)
    source = str(source or up.url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f'.{name}-fetch-') as tmp:
        work = Path(tmp) / name
        for cmd in (['git', 'clone', '--quiet', '--no-checkout', source, str(work)],
                    ['git', '-C', str(work), '-c', 'advice.detachedHead=false', 'checkout', '--quiet', up.commit]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ['(no output)'])[-1]
                raise DDOPatchError(f'`{" ".join(cmd[:3])} ...` failed for {source}: {last}')
        work.rename(dest)
    return dest
