"""Applying, checking and reverting the patch files under `patches/<upstream>/` on a user's checkout.

Every operation works on a scratch directory that holds copies of only the files the patches touch, with
`git apply` (which works outside git repositories), and writes to the checkout only if every step went
through there: a conflict anywhere leaves the checkout untouched, never half-patched. No state is stored;
which patches are applied is read from the files:

1. unwind: walk the series backwards, reversing each patch that reverses cleanly (a later patch may
   change the context of an earlier one, so the order matters); what remains is the unpatched files;
2. replay: walk it forwards, applying the patches that should end up applied (those that were, plus the
   selected ones for `apply`/`check`; those that were, minus the selected ones for `revert`). A patch
   that does not apply there conflicts with a local edit.

Applying twice is therefore a no-op, and revert restores the files byte for byte. A git checkout's
commit is its HEAD. A plain copy (no `.git`) is identified by content: after the unwind, each touched
file must hash (as a git blob) to the pinned blob in the `index <pinned>..<patched>` line of the first
patch that touches it (the patches are made with `git format-patch --full-index`).
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

# An installed wheel carries the patch files as package data (ddo_patch/patches/); a checkout has them at its top.
_INSTALLED_PATCHES = Path(__file__).resolve().parent / 'patches'
PATCH_DIR = _INSTALLED_PATCHES if _INSTALLED_PATCHES.is_dir() else Path(__file__).resolve().parents[1] / 'patches'

APPLIED, APPLICABLE, CONFLICT = 'applied', 'would apply', 'conflict'


@dataclasses.dataclass(frozen=True)
class Patch:
    path: Path
    files: tuple    # repository-relative paths the patch touches
    blobs: dict     # path -> git blob hash of the file before this patch ('0' * 40: the patch creates it)

    @property
    def name(self) -> str:   # '0001-generate-images-balanced' -> 'generate-images-balanced'
        return re.sub(r'^\d+-', '', self.path.stem)


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
    """Copies of the touched files of a checkout (or of another scratch), patched in place of the checkout."""

    def __init__(self, source: Path, files, folder: Path):
        self.dir, self.files = folder, files
        self.dir.mkdir(parents=True)
        for rel in self.files:
            if (source / rel).is_file():
                (self.dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / rel, self.dir / rel)

    def unwind(self, patches: list) -> set:
        """Reverse the applied patches, last first; returns their names."""
        applied = set()
        for patch in reversed(patches):
            if _git_apply(self.dir, patch, '--reverse') is None:
                applied.add(patch.name)
        return applied

    def apply(self, patch: Patch) -> Optional[str]:
        return _git_apply(self.dir, patch)

    def matches(self, blobs: dict) -> bool:
        for rel, blob in blobs.items():
            path = self.dir / rel
            if (git_blob_hash(path.read_bytes()) if path.is_file() else '0' * 40) != blob:
                return False
        return True

    def write_back(self, root: Path):
        """Make the checkout's touched files equal to the scratch copies (each replaced atomically)."""
        for rel in self.files:
            source, target = self.dir / rel, root / rel
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
            elif target.is_file():
                target.unlink()


def pinned_blobs(patches: list) -> dict:
    """Touched path -> its blob at the pinned commit: the preimage in the first patch that touches it."""
    blobs = {}
    for patch in patches:
        for rel in patch.files:
            blobs.setdefault(rel, patch.blobs.get(rel))
    return blobs


def _replay(root, only, command: str) -> Report:
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DDOPatchError(f'{root} is not a directory; pass --repo the folder of an EDM2 or VAR checkout')
    name = identify(root)
    if shutil.which('git') is None:
        raise DDOPatchError('`git` is not installed; ddo-patch applies its patches with `git apply` (no repository needed)')
    up = upstream.get_upstream(name)
    patches = series(name)
    chosen = {p.name for p in select(patches, only)}
    with tempfile.TemporaryDirectory(prefix='ddo-patch-') as tmp:
        scratch = _Scratch(root, sorted({f for p in patches for f in p.files}), Path(tmp) / 'tree')
        applied = scratch.unwind(patches)
        if (root / '.git').exists():
            commit = upstream.git_commit(root)
        else:
            commit = up.commit if scratch.matches(pinned_blobs(patches)) else None
        report = Report(name, root, commit, commit == up.commit, {})
        if not report.pinned:
            where = f'at commit {commit}' if commit else 'a plain copy whose files match no pinned version'
            warnings.warn(f'{root} is {where}; the patches are written against {name} {up.commit}',
                          upstream.UpstreamCommitWarning, stacklevel=3)

        # The whole series must apply to the unwound files: a patch that neither reverses nor applies there
        # meets local edits (also when it is only to be reverted: its lines were edited after applying).
        full = _Scratch(scratch.dir, scratch.files, Path(tmp) / 'full')
        errors = {patch.name: full.apply(patch) for patch in patches}
        wanted = applied - chosen if command == 'revert' else applied | chosen
        for patch in patches:
            error = errors[patch.name] or (scratch.apply(patch) if patch.name in wanted else None)
            if patch.name in chosen or (error and patch.name in wanted):
                state = APPLIED if patch.name in applied else APPLICABLE
                report.states[patch.name] = f'{CONFLICT}: {error}' if error else state

        conflicts = [f'{n} ({s.split(": ", 1)[1]})' for n, s in report.states.items() if s.startswith(CONFLICT)]
        if command != 'check' and conflicts:
            raise DDOPatchError(f'nothing changed in {root}: {"; ".join(conflicts)} does not apply; undo the local '
                                f'edits to those files, or use a fresh checkout of {name} at {up.commit[:12]} (a patch '
                                f'needs the ones before it in the series)')
        if command != 'check':
            scratch.write_back(root)
    return report


def check(root, only: Iterable[str] = ()) -> Report:
    """What `apply` would do with each patch (applied / would apply / conflict); changes nothing."""
    return _replay(root, only, 'check')


def apply(root, only: Iterable[str] = ()) -> Report:
    """Apply the selected patches that are not applied yet; all or nothing."""
    return _replay(root, only, 'apply')


def revert(root, only: Iterable[str] = ()) -> Report:
    """Reverse the selected patches that are applied, restoring the files byte for byte; all or nothing."""
    return _replay(root, only, 'revert')
