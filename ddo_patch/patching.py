"""Applying, checking and reverting the patch files under `patches/<upstream>/` on a user's checkout.

Every operation first replays the whole series in a scratch directory that holds copies of only the
files the patches touch, with `git apply` (which works outside git repositories), and writes to the
checkout only if every selected patch went through there: a conflict anywhere leaves the checkout
untouched, never half-patched. Which patches are applied is read from the files themselves, so no state
is stored: a patch counts as applied when it reverses cleanly (checked before the forward direction,
because an additive patch may still apply forward on top of itself). Applying twice is a no-op, and
reverting replays the applied patches backwards, which restores the files byte for byte.

A git checkout's commit is its HEAD. A plain copy (no `.git`) is identified by content: with the applied
patches reversed, each touched file must hash (as a git blob) to the pinned blob recorded in the
`index <pinned>..<patched>` line of the first patch that touches it (`git format-patch --full-index`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Optional

from ddo_patch import upstream
from ddo_patch.errors import DDOPatchError

PATCH_DIR = Path(__file__).resolve().parents[1] / 'patches'

APPLIED, APPLICABLE, CONFLICT = 'applied', 'would apply', 'conflict'


@dataclasses.dataclass(frozen=True)
class Patch:
    path: Path
    files: tuple    # repository-relative paths the patch touches
    blobs: dict     # path -> git blob hash of the file before this patch ('0' * 40: the patch creates it)

    @property
    def name(self) -> str:   # '0001-generate-images-balanced' -> 'generate-images-balanced'
        return re.sub(r'^\d+-', '', self.path.stem)

    def summary(self) -> str:
        """The patch's subject line (what it does)."""
        match = re.search(r'^Subject:\s*(?:\[PATCH[^\]]*\]\s*)?(.*(?:\n [^\n]*)*)', self.path.read_text(), re.MULTILINE)
        return re.sub(r'\n ', ' ', match.group(1)) if match else ''


@dataclasses.dataclass
class Report:
    upstream: str
    root: Path
    commit: Optional[str]   # None: a plain copy whose files match no pinned version
    pinned: bool
    states: dict            # patch name -> APPLIED | APPLICABLE | CONFLICT (with the reason after ': ')


def parse_patch(path: Path) -> Patch:
    files, blobs = [], {}
    current = None
    for line in path.read_text().splitlines():
        match = re.match(r'^diff --git a/(\S+) b/(\S+)$', line)
        if match:
            current = match.group(2)
            files.append(current)
            continue
        match = re.match(r'^index ([0-9a-f]+)\.\.([0-9a-f]+)', line)
        if match and current is not None:
            blobs[current] = match.group(1)
    if not files:
        raise DDOPatchError(f'{path} contains no diff; the patch files of this installation are damaged')
    return Patch(path, tuple(files), blobs)


def series(name: str) -> list:
    """The patches for upstream `name`, in the order they apply."""
    folder = PATCH_DIR / name
    if not folder.is_dir():
        raise DDOPatchError(f'no patch files at {folder}; install ddo-patch from its source tree (pip install -e)')
    return [parse_patch(p) for p in sorted(folder.glob('*.patch'))]


def select(patches: list, only: Iterable[str]) -> list:
    only = list(only)
    if not only:
        return patches
    known = {p.name: p for p in patches} | {p.path.stem: p for p in patches}
    unknown = [n for n in only if n not in known]
    if unknown:
        raise DDOPatchError(f'no patch named {", ".join(unknown)}; choose from {", ".join(p.name for p in patches)}')
    wanted = {known[n].path for n in only}
    return [p for p in patches if p.path in wanted]


def identify(root: Path) -> str:
    """Which upstream the folder is a checkout of, or a one-line error saying what was expected."""
    root = Path(root)
    found = [name for name in upstream.UPSTREAMS if upstream.is_checkout(name, root)]
    if len(found) != 1:
        expected = '; '.join(f'{name}: {", ".join(up.markers)}' for name, up in upstream.UPSTREAMS.items())
        raise DDOPatchError(f'{root} is not a checkout of a supported upstream; expected the files of one of them ({expected})')
    return found[0]


def git_blob_hash(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


def _git_apply(scratch: Path, patch: Patch, *flags) -> Optional[str]:
    """Run `git apply` in the scratch directory; None on success, else git's first error line."""
    # The ceiling keeps git from treating a repository above the scratch directory as the one to patch.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(scratch.parent))
    proc = subprocess.run(['git', 'apply', '--whitespace=nowarn', *flags, str(patch.path)], cwd=scratch, env=env,
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or ['git apply failed'])[0].removeprefix('error: ')


class _Scratch:
    """Copies of the touched files of a checkout, patched in place of the checkout."""

    def __init__(self, root: Path, patches: list, tmp: str):
        self.root, self.dir = root, Path(tmp) / 'tree'
        self.files = sorted({f for p in patches for f in p.files})
        for rel in self.files:
            if (root / rel).is_file():
                (self.dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / rel, self.dir / rel)
        self.dir.mkdir(parents=True, exist_ok=True)

    def step(self, patch: Patch, reverse: bool, write: bool) -> tuple:
        """(state, reason) of `patch` here; with `write`, move it towards applied (or, `reverse`, unapplied)."""
        if _git_apply(self.dir, patch, '--check', '--reverse') is None:
            if write and reverse:
                _git_apply(self.dir, patch, '--reverse')
            return APPLIED, ''
        error = _git_apply(self.dir, patch, '--check')
        if error is not None:
            return CONFLICT, error
        if write and not reverse:
            _git_apply(self.dir, patch)
        return APPLICABLE, ''

    def blob(self, rel: str) -> str:
        path = self.dir / rel
        return git_blob_hash(path.read_bytes()) if path.is_file() else '0' * 40

    def write_back(self) -> list:
        """Make the checkout's touched files equal to the scratch copies; returns the changed paths."""
        changed = []
        for rel in self.files:
            source, target = self.dir / rel, self.root / rel
            if source.is_file():
                data = source.read_bytes()
                if target.is_file() and target.read_bytes() == data:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f'.{target.name}.ddo-patch-tmp')
                tmp.write_bytes(data)
                if target.is_file():
                    shutil.copymode(target, tmp)
                os.replace(tmp, target)
                changed.append(rel)
            elif target.is_file():
                target.unlink()
                changed.append(rel)
        return changed


def _plain_copy_commit(name: str, root: Path, patches: list) -> Optional[str]:
    """The pinned commit if the touched files, with the applied patches reversed, are the pinned blobs."""
    pinned = {}
    for patch in patches:
        for rel in patch.files:
            pinned.setdefault(rel, patch.blobs.get(rel))
    with tempfile.TemporaryDirectory(prefix='ddo-patch-') as tmp:
        scratch = _Scratch(root, patches, tmp)
        for patch in reversed(patches):
            if scratch.step(patch, reverse=True, write=True)[0] == CONFLICT:
                return None
        if all(scratch.blob(rel) == blob for rel, blob in pinned.items()):
            return upstream.get_upstream(name).commit
    return None


def _describe(root: Path) -> tuple:
    """(upstream name, its patch series, Report without states), warning when the commit is not the pin."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DDOPatchError(f'{root} is not a directory; pass --repo the folder of an EDM2 or VAR checkout')
    name = identify(root)
    patches = series(name)
    pin = upstream.get_upstream(name).commit
    has_git = (root / '.git').exists()
    commit = upstream.git_commit(root) if has_git else _plain_copy_commit(name, root, patches)
    report = Report(name, root, commit, commit == pin, {})
    if not report.pinned:
        where = f'at commit {commit}' if commit else 'a plain copy whose files match no pinned version'
        warnings.warn(f'{root} is {where}; the patches are written against {name} {pin}', upstream.UpstreamCommitWarning, stacklevel=3)
    return name, patches, report


def _replay(root, only, reverse: bool, write: bool) -> Report:
    name, all_patches, report = _describe(root)
    chosen = select(all_patches, only)
    with tempfile.TemporaryDirectory(prefix='ddo-patch-') as tmp:
        scratch = _Scratch(report.root, all_patches, tmp)
        for patch in (reversed(chosen) if reverse else chosen):
            state, reason = scratch.step(patch, reverse=reverse, write=True)
            report.states[patch.name] = f'{state}: {reason}' if reason else state
        conflicts = [f'{n} ({s.split(": ", 1)[1]})' for n, s in report.states.items() if s.startswith(CONFLICT)]
        if write and conflicts:
            raise DDOPatchError(f'nothing changed in {report.root}: {"; ".join(conflicts)} does not apply; '
                                f'undo the local edits to those files (or use a fresh checkout at {name} '
                                f'{upstream.get_upstream(name).commit[:12]})')
        if write:
            scratch.write_back()
    if reverse:  # report in series order
        report.states = {p.name: report.states[p.name] for p in chosen}
    return report


def check(root, only: Iterable[str] = ()) -> Report:
    """What `apply` would do with each patch (applied / would apply / conflict); changes nothing."""
    return _replay(root, only, reverse=False, write=False)


def apply(root, only: Iterable[str] = ()) -> Report:
    """Apply the selected patches that are not applied yet; all or nothing."""
    return _replay(root, only, reverse=False, write=True)


def revert(root, only: Iterable[str] = ()) -> Report:
    """Reverse the selected patches that are applied, restoring the files byte for byte; all or nothing."""
    return _replay(root, only, reverse=True, write=True)
