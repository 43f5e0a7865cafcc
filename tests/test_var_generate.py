"""`python -m var_ext.generate`: class-balanced PNGs and the evaluator's .npz, resumable, seed-deterministic."""

import numpy as np
import pytest

from var_ext import generate
from var_tiny import one_cpu_thread, tiny_checkpoints  # noqa: F401 (fixture)

pytestmark = [pytest.mark.upstream, pytest.mark.usefixtures('one_cpu_thread')]


def run(var_root, tmp_path_factory, outdir, *extra, images=20):
    vae, ckpt = tiny_checkpoints(str(tmp_path_factory.getbasetemp()))
    generate.main(['--net', ckpt, '--vae', vae, '--depth', '2', '--patch-nums', '1_2_3_4', '--num-classes', '10',
                 '--vae-vocab', '64', '--vae-ch', '32', '--vae-z', '8', '--per-class', '2', '--batch', '8',
                 '--outdir', str(outdir), *extra])
    return np.load(outdir / f'samples_{images}x64x64x3.npz')


def test_balanced_npz_and_resumption_reproduce_each_seed(var_root, tmp_path_factory, tmp_path):
    first = run(var_root, tmp_path_factory, tmp_path)
    assert first['arr_0'].dtype == np.uint8 and first['arr_0'].shape == (20, 64, 64, 3)
    assert first['arr_1'].tolist() == [s % 10 for s in range(20)]
    for seed in (3, 11, 19):   # as if the run had been killed before these were written
        (tmp_path / 'images' / f'{seed:06d}.png').unlink()
    again = run(var_root, tmp_path_factory, tmp_path)
    assert np.array_equal(first['arr_0'], again['arr_0'])
    assert len(list((tmp_path / 'images').iterdir())) == 20


def test_classes_sample_the_same_seeds_and_images_as_the_full_set(var_root, tmp_path_factory, tmp_path):
    """--classes 3,7-8 keeps seeds 3, 7, 8, 13, 17, 18 of the 20 (2 per class), each image as the full run draws it."""
    some = run(var_root, tmp_path_factory, tmp_path / 'some', '--classes', '3,7-8', images=6)
    assert some['arr_1'].tolist() == [3, 7, 8, 3, 7, 8]
    assert sorted(p.name for p in (tmp_path / 'some' / 'images').iterdir()) == [f'{s:06d}.png' for s in (3, 7, 8, 13, 17, 18)]
    full = run(var_root, tmp_path_factory, tmp_path / 'full')
    assert np.array_equal(some['arr_0'], full['arr_0'][[3, 7, 8, 13, 17, 18]])


@pytest.mark.parametrize('extra, message', [
    (('--top-p', '1.5'), 'top-p'),
    (('--classes', '3,12'), '--classes 3,12 names class 12, outside [0, 10)'),
    (('--classes', '3-x'), 'bad class list --classes "3-x"; write e.g. 0,5-9'),
])
def test_bad_sampling_options_fail_in_one_line(var_root, tmp_path_factory, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        run(var_root, tmp_path_factory, tmp_path / 'out', *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith('error: ') and message in err[-1], err
    assert not (tmp_path / 'out').exists()
