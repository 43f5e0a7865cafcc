"""The patch files themselves (no upstream checkout needed): self-describing, identifiable, and selectable."""

import re

import pytest

from ddo_patch import patching
from ddo_patch.errors import DDOPatchError


@pytest.mark.parametrize('name', ['edm2', 'var'])
def test_every_patch_says_what_and_why_and_records_the_pinned_blobs(name):
    patches = patching.series(name)
    assert len(patches) >= 3
    for patch in patches:
        text = patch.path.read_text()
        header, _, diff = text.partition('\ndiff --git ')
        assert re.search(r'^Subject: \[PATCH \d+/\d+\] \S', header, re.MULTILINE), patch.path.name
        body = header.split('\n\n', 1)[1].split('\n---\n')[0]
        assert len(body.strip().splitlines()) >= 4, f'{patch.path.name}: explain why in the header'
        assert set(patch.blobs) == set(patch.files) and all(re.fullmatch(r'[0-9a-f]{40}', b) for b in patch.blobs.values())
    # A file touched by several patches is identified by its blob before the first of them.
    pinned = patching.pinned_blobs(patches)
    for rel in pinned:
        touching = [p for p in patches if rel in p.files]
        assert pinned[rel] == touching[0].blobs[rel] and all(p.blobs[rel] != pinned[rel] for p in touching[1:])


def test_only_accepts_names_with_or_without_the_number():
    patches = patching.series('edm2')
    assert [p.name for p in patching.select(patches, ['0003-train-edm2-ddo', 'generate-images-balanced'])] == \
        ['generate-images-balanced', 'train-edm2-ddo']
    assert patching.select(patches, []) == patches
    with pytest.raises(DDOPatchError, match='no patch named nope; choose from generate-images-balanced, generate-images-cpu'):
        patching.select(patches, ['nope'])


def test_git_blob_hash_is_gits():
    assert patching.git_blob_hash(b'') == 'e69de29bb2d1d6434b8b29ae775ad8c2e48c5391'
    assert patching.git_blob_hash(b'hello\n') == 'ce013625030ba8dba906f756967f9e9ca394464a'
