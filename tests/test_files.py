"""The one crash-safe write used by every resumable entry point."""

import os

import pytest

from ddo_patch.files import write_atomic


@pytest.mark.parametrize('durable', [False, True])
def test_write_atomic_replaces_whole_files_and_creates_folders(tmp_path, durable):
    target = tmp_path / 'deep' / 'out.bin'
    write_atomic(target, lambda f: f.write(b'old'), durable=durable)
    write_atomic(target, lambda f: f.write(b'new content'), durable=durable)
    assert target.read_bytes() == b'new content'
    assert os.listdir(target.parent) == ['out.bin']


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / 'out.json'
    target.write_text('{"kept": true}')

    def half_then_crash(f):
        f.write(b'{"trunc')
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a write

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, half_then_crash)
    assert target.read_text() == '{"kept": true}'
    assert os.listdir(tmp_path) == ['out.json']
