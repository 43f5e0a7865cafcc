"""`ddo-patch apply | check | revert` on fresh copies of the pinned upstreams (git clones and plain copies),
and the patched upstream scripts themselves, run at tiny size on the CPU."""

import json
import math
import os
import shutil
import site
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pytest

from ddo_patch import patching, upstream
from ddo_patch.errors import DDOPatchError
from edm2_helpers import CLASSES, run

pytestmark = pytest.mark.upstream


@pytest.fixture(params=['edm2', 'var'])
def upstream_root(request):
    return request.getfixturevalue(f'{request.param}_root')


def fresh_copy(root, dest, keep_git=True):
    shutil.copytree(root, dest, symlinks=True, ignore=None if keep_git else shutil.ignore_patterns('.git'))
    return dest


def tree(root):
    """Every file under root (.git included) -> (bytes, mode): what 'byte for byte' compares."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                files[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mode)
    return files


def cli(*args):
    return subprocess.run([sys.executable, '-m', 'ddo_patch.cli', *map(str, args)], capture_output=True, text=True, timeout=120)


def states(report):
    return {name: state.split(':')[0] for name, state in report.states.items()}


@pytest.mark.parametrize('keep_git', [True, False], ids=['git-clone', 'plain-copy'])
def test_apply_twice_then_revert_restores_the_tree_byte_for_byte(upstream_root, tmp_path, keep_git):
    repo = fresh_copy(upstream_root, tmp_path / 'repo', keep_git)
    name = patching.identify(repo)
    names = [p.name for p in patching.series(name)]
    original = tree(repo)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the pinned commit is recognised, also from the file contents alone
        report = patching.check(repo)
        assert report.commit == upstream.get_upstream(name).commit and report.pinned
        assert states(report) == {n: patching.APPLICABLE for n in names}
        assert tree(repo) == original  # check changes nothing

        assert states(patching.apply(repo)) == {n: patching.APPLICABLE for n in names}
        patched = tree(repo)
        changed = {rel for rel in original if patched[rel] != original[rel]}
        assert changed == {f for p in patching.series(name) for f in p.files} and set(patched) == set(original)

        second = patching.apply(repo)
        assert second.pinned and states(second) == {n: patching.APPLIED for n in names}
        assert tree(repo) == patched  # applying twice is a no-op

        assert states(patching.revert(repo)) == {n: patching.APPLIED for n in names}
    assert tree(repo) == original


def test_an_installed_wheel_carries_the_patches_and_applies_them(edm2_root, tmp_path):
    """`pip install ddo-patch` (not editable): the wheel ships patches/ as ddo_patch/patches/, so `ddo-patch apply`
    and `revert` work from the installed package alone (run outside the repository, in a fresh venv)."""
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    wheels = tmp_path / 'wheels'
    build = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps', '--no-build-isolation',
                            '--wheel-dir', str(wheels), project], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)
    python = str(venv / 'bin' / 'python')
    # The test environment's packages (click, psutil, ...) as a plain path after the venv's own: its .pth files, the
    # editable install of this checkout among them, are not processed there, so ddo_patch comes from the wheel.
    own = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], capture_output=True,
                         text=True, check=True).stdout.strip()
    with open(os.path.join(own, 'test-environment.pth'), 'w') as f:
        f.write('\n'.join(site.getsitepackages()) + '\n')
    install = subprocess.run([sys.executable, '-m', 'pip', '--python', python, 'install', '--quiet', '--no-deps',
                              *map(str, wheels.glob('ddo_patch-*.whl'))], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    where = subprocess.run([python, '-c', 'from ddo_patch import patching; print(patching.PATCH_DIR)'], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)) and where.endswith(os.path.join('ddo_patch', 'patches')), where
    repo = fresh_copy(edm2_root, tmp_path / 'repo', keep_git=False)
    original = tree(repo)
    for command in ('apply', 'revert'):
        proc = subprocess.run([python, '-m', 'ddo_patch.cli', command, '--repo', str(repo)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        if command == 'apply':
            assert 'balanced' in (repo / 'generate_images.py').read_text() and tree(repo) != original
    assert tree(repo) == original


def test_only_applies_the_named_patch_and_the_rest_follows(edm2_root, tmp_path):
    repo = fresh_copy(edm2_root, tmp_path / 'repo', keep_git=False)
    original = tree(repo)
    patching.apply(repo, only=['train-edm2-ddo'])
    assert states(patching.check(repo)) == {'generate-images-balanced': patching.APPLICABLE,
                                            'generate-images-cpu': patching.APPLICABLE, 'train-edm2-ddo': patching.APPLIED}
    assert tree(repo)['generate_images.py'] == original['generate_images.py']
    report = patching.apply(repo)
    assert report.pinned and set(states(report).values()) == {patching.APPLICABLE, patching.APPLIED}
    patching.revert(repo)
    assert tree(repo) == original
    with pytest.raises(DDOPatchError, match='no patch named nope; choose from generate-images-balanced'):
        patching.apply(repo, only=['nope'])


def test_conflicting_local_edit_is_refused_and_nothing_changes(edm2_root, tmp_path):
    repo = fresh_copy(edm2_root, tmp_path / 'repo')
    script = repo / 'train_edm2.py'
    script.write_text(script.read_text().replace("set_start_method('spawn')", "set_start_method('forkserver')"))
    edited = tree(repo)

    proc = cli('apply', '--repo', repo)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith('error: nothing changed') and 'train-edm2-ddo (patch failed: train_edm2.py:' in lines[0]
    assert tree(repo) == edited  # generate_images.py's patches would apply, but all or nothing

    proc = cli('check', '--repo', repo)
    assert proc.returncode == 1 and 'would apply     generate-images-cpu' in proc.stdout
    assert 'conflict        train-edm2-ddo  (patch failed: train_edm2.py:' in proc.stdout
    assert tree(repo) == edited


@pytest.mark.filterwarnings('ignore::ddo_patch.upstream.UpstreamCommitWarning')  # the edit hides the pinned version
def test_revert_refuses_when_a_patched_line_was_edited(var_root, tmp_path):
    repo = fresh_copy(var_root, tmp_path / 'repo', keep_git=False)
    patching.apply(repo)
    model = repo / 'models' / 'var.py'
    model.write_text(model.read_text().replace('halves = 1 if cfg == 0 else 2', 'halves = 2'))
    edited = tree(repo)
    with pytest.raises(DDOPatchError, match=r'nothing changed .*: guidance-free-fast-path \(patch failed: models/var.py:'):
        patching.revert(repo)
    assert tree(repo) == edited
    assert states(patching.check(repo))['guidance-free-fast-path'] == patching.CONFLICT
    patching.revert(repo, only=['train-ddo'])  # the others can still be reverted on their own
    assert states(patching.check(repo))['train-ddo'] == patching.APPLICABLE


def test_unpinned_checkouts_warn_and_still_apply(edm2_root, tmp_path):
    # A plain copy with a harmless edit to a patched file no longer matches the pinned blobs.
    plain = fresh_copy(edm2_root, tmp_path / 'plain', keep_git=False)
    with open(plain / 'train_edm2.py', 'a') as f:
        f.write('# a local note\n')
    with pytest.warns(upstream.UpstreamCommitWarning, match='match no pinned version'):
        report = patching.apply(plain)
    assert report.commit is None and not report.pinned
    assert set(states(report).values()) == {patching.APPLICABLE}

    # A git clone at another commit is named.
    clone = fresh_copy(edm2_root, tmp_path / 'clone')
    git = ['git', '-C', str(clone), '-c', 'user.name=t', '-c', 'user.email=t@t']
    subprocess.run(git + ['commit', '-q', '--allow-empty', '-m', 'local'], check=True)
    head = upstream.git_commit(clone)
    proc = cli('apply', '--repo', clone)
    assert proc.returncode == 0
    assert f'warning: {clone} is at commit {head}; the patches are written against edm2 {upstream.UPSTREAMS["edm2"].commit}' in proc.stderr


def test_check_on_an_unknown_folder_says_what_it_expected(tmp_path):
    proc = cli('check', '--repo', tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f'error: {tmp_path} is not a checkout of a supported upstream; expected the files of '
                                   f'one of them (edm2: train_edm2.py, training/training_loop.py, torch_utils/persistence.py; '
                                   f'var: trainer.py, models/var.py, utils/arg_util.py)')


# ---- The patched EDM2 scripts, run as users run them (tiny data, CPU) ----------------------------------------

ALPHA, BETA = 2.0, 0.05


@pytest.fixture(scope='module')
def patched_edm2(edm2_root, world, tmp_path_factory):
    root = tmp_path_factory.mktemp('patched-edm2')
    repo = fresh_copy(edm2_root, root / 'edm2', keep_git=False)
    patching.apply(repo)
    return dict(root=root, repo=repo, data=world['data'], ref=world['pretrained'])


def read_png(path):
    import PIL.Image
    return np.asarray(PIL.Image.open(path), dtype=np.int16)


def test_generate_images_balanced_labels_and_dataset_json(patched_edm2):
    p = patched_edm2
    generate = [str(p['repo'] / 'generate_images.py'), '--net', p['ref'], '--steps', '4', '--batch', '8']
    run(generate + ['--balanced', '--seeds', '0-63', '--outdir', str(p['root'] / 'balanced')], p['repo'], p['root'])
    run(generate + ['--class', '1', '--seeds', '0-7', '--outdir', str(p['root'] / 'class1')], p['repo'], p['root'])

    with open(p['root'] / 'balanced' / 'dataset.json') as f:
        labels = json.load(f)['labels']
    assert labels == [[f'{seed:06d}.png', seed % CLASSES] for seed in range(64)]
    assert Counter(label for _, label in labels) == {c: 64 // CLASSES for c in range(CLASSES)}
    # The label reached the network: seeds 1 and 5 (class 1) match upstream's --class 1 images of the same
    # seeds (same noise), and seed 0 (class 0) does not.
    for seed in (1, 5):
        diff = read_png(p['root'] / 'balanced' / f'{seed:06d}.png') - read_png(p['root'] / 'class1' / f'{seed:06d}.png')
        assert np.abs(diff).max() <= 1
    assert np.abs(read_png(p['root'] / 'balanced' / '000000.png') - read_png(p['root'] / 'class1' / '000000.png')).mean() > 1

    # With --subdirs the labels name the files where upstream puts them (a folder per 1000 seeds).
    run(generate + ['--balanced', '--subdirs', '--seeds', '998-1001', '--outdir', str(p['root'] / 'subdirs')], p['repo'], p['root'])
    with open(p['root'] / 'subdirs' / 'dataset.json') as f:
        labels = json.load(f)['labels']
    assert labels == [['000000/000998.png', 2], ['000000/000999.png', 3], ['001000/001000.png', 0], ['001000/001001.png', 1]]
    assert all((p['root'] / 'subdirs' / name).is_file() for name, _ in labels)

    proc = run(generate + ['--balanced', '--class', '1', '--outdir', str(p['root'] / 'x')], p['repo'], p['root'], check=False)
    assert proc.returncode != 0 and '--balanced and --class are mutually exclusive' in proc.stderr


def test_generate_images_balanced_under_torchrun_labels_every_rank_s_images(patched_edm2):
    p = patched_edm2
    out = p['root'] / 'two-ranks'
    run(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(p['repo'] / 'generate_images.py'),
         '--net', p['ref'], '--balanced', '--seeds', '0-23', '--steps', '2', '--batch', '4', '--outdir', str(out)],
        p['repo'], p['root'])
    with open(out / 'dataset.json') as f:
        labels = json.load(f)['labels']
    assert labels == [[f'{seed:06d}.png', seed % CLASSES] for seed in range(24)]
    assert sorted(os.listdir(out)) == sorted([name for name, _ in labels] + ['dataset.json'])


def test_train_edm2_runs_ddo(patched_edm2):
    p = patched_edm2
    fake = str(p['root'] / 'fake')
    run([str(p['repo'] / 'generate_images.py'), '--net', p['ref'], '--balanced', '--seeds', '0-63', '--steps', '4',
         '--outdir', fake], p['repo'], p['root'])
    out = p['root'] / 'ddo'
    args = [str(p['repo'] / 'train_edm2.py'), '--outdir', str(out), '--data', p['data'], '--preset', 'ddo-img64-s',
            '--ddo-ref', p['ref'], '--ddo-fake', fake, '--ddo-alpha', str(ALPHA), '--ddo-beta', str(BETA),
            '--batch', '64', '--duration', '1Ki', '--lr', '1e-3', '--status', '64', '--snapshot', '1Ki', '--checkpoint', '1Ki']
    run(args, p['repo'], p['root'])
    assert {'network-snapshot-0000001-0.050.pkl', 'training-state-0000001.pt'} <= set(os.listdir(out))
    with open(out / 'training_options.json') as f:
        options = json.load(f)
    assert options['loss_kwargs']['class_name'] == 'edm2_ext.loss.DDOLoss' and options['loss_kwargs']['alpha'] == ALPHA
    assert options['lr_kwargs']['ref_lr'] == 1e-3 and options['lr_kwargs']['ref_batches'] == 2000  # given / preset
    assert options['ema_kwargs']['stds'] == [0.05] and options['total_nimg'] == 1024 and options['batch_size'] == 64
    with open(out / 'stats.jsonl') as f:
        trained = [row for row in map(json.loads, f) if 'Loss/loss' in row]
    assert len(trained) == 1024 // 64
    assert trained[0]['Loss/loss'] == pytest.approx((1 + ALPHA) * math.log(2), abs=1e-4)  # theta = theta_ref at step 1
    assert all(math.isfinite(row['DDO/delta_fake']) for row in trained)


def test_train_edm2_ddo_round_picks_the_presets_schedule(patched_edm2):
    """--ddo-round N is edm2_ext.train's --round N: round 17 of ddo-img64-s trains with P_std 3.0 and lr 2e-5."""
    p = patched_edm2
    base = [str(p['repo'] / 'train_edm2.py'), '--outdir', str(p['root'] / 'dry'), '--data', p['data'], '--preset',
            'ddo-img64-s', '--ddo-ref', p['ref'], '--ddo-fake', p['data'], '--dry-run']
    for extra, (P_std, lr) in (([], (1.6, 5e-5)), (['--ddo-round', '17'], (3.0, 2e-5))):
        out = run(base + extra, p['repo'], p['root']).stdout
        options = json.loads(out[out.index('{'):out.rindex('}') + 1])
        assert (options['loss_kwargs']['P_std'], options['lr_kwargs']['ref_lr']) == (P_std, lr)
    assert not os.path.exists(p['root'] / 'dry')


@pytest.mark.parametrize('change, message', [
    (['--fp16', 'True'], '--fp16 does not apply to DDO'),
    (['--preset', 'edm2-img64-s'], '--preset=edm2-img64-s is a pretraining preset; DDO needs one of ddo-img64-s, ddo-img512-l'),
    (['--ddo-fake', None], 'DDO needs both --ddo-ref'),
])
def test_train_edm2_ddo_refuses_bad_options_in_one_line(patched_edm2, change, message):
    p = patched_edm2
    args = {'--outdir': str(p['root'] / 'never'), '--data': p['data'], '--preset': 'ddo-img64-s', '--ddo-ref': p['ref'],
            '--ddo-fake': p['data']}
    args[change[0]] = change[1]
    proc = run([str(p['repo'] / 'train_edm2.py')] + [a for k, v in args.items() if v is not None for a in (k, v)],
               p['repo'], p['root'], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(f'Error: {message}'), proc.stderr
    assert not os.path.exists(p['root'] / 'never')


# ---- The patched VAR sampler --------------------------------------------------------------------------------

SAMPLER_SCRIPT = '''
import sys, torch
sys.path.insert(0, sys.argv[1])
from models import build_vae_var
vae, var = build_vae_var(device='cpu', patch_nums=(1, 2, 3, 4), V=64, Cvae=8, ch=32, num_classes=10, depth=2,
                         flash_if_available=False, fused_if_available=False)
torch.manual_seed(0)  # the same weights in every process (upstream leaves the VQVAE uninitialised)
for p in list(vae.parameters()) + list(var.parameters()):
    p.data.normal_(0, 0.3)
batch_sizes = []
var.blocks[0].register_forward_hook(lambda module, args, kwargs, out: batch_sizes.append(kwargs['x'].shape[0]), with_kwargs=True)
results = {}
for cfg in (0.0, 1.5):
    batch_sizes.clear()
    images = var.autoregressive_infer_cfg(B=4, label_B=torch.arange(4), g_seed=0, cfg=cfg)
    results[cfg] = (images, list(batch_sizes))
torch.save(results, sys.argv[2])
'''


def test_var_sampler_skips_the_unconditional_half_at_cfg_0_with_the_same_samples(var_root, tmp_path):
    import torch
    pytest.importorskip('huggingface_hub', reason="VAR's models import it (pip install huggingface_hub)")
    repo = fresh_copy(var_root, tmp_path / 'var', keep_git=False)
    patching.apply(repo)
    samples = {}
    for name, root in (('upstream', var_root), ('patched', repo)):
        subprocess.run([sys.executable, '-c', SAMPLER_SCRIPT, str(root), str(tmp_path / f'{name}.pt')], cwd=tmp_path,
                       env=dict(os.environ, OMP_NUM_THREADS='1'), check=True, capture_output=True, timeout=120)
        samples[name] = torch.load(tmp_path / f'{name}.pt')
    assert samples['upstream'][0.0][1] == [8] * 4 and samples['patched'][0.0][1] == [4] * 4  # B = 4 per scale, not 2B
    assert samples['upstream'][1.5][1] == samples['patched'][1.5][1] == [8] * 4
    for cfg in (0.0, 1.5):
        assert torch.equal(samples['patched'][cfg][0], samples['upstream'][cfg][0])
    assert not torch.equal(samples['patched'][0.0][0], samples['patched'][1.5][0])


# ---- The patched VAR train.py (needs var_ext; tiny models and a tokenised data set from tests/var_tiny.py) ------

TORCHVISION_STAND_IN = {  # upstream's train.py imports its ImageNet pipeline at the top; DDO on tokens never uses it
    'torchvision/__init__.py': '',
    'torchvision/datasets/__init__.py': '',
    'torchvision/datasets/folder.py': 'DatasetFolder, IMG_EXTENSIONS = object, ()\n',
    'torchvision/transforms/__init__.py': 'InterpolationMode = transforms = None\n',
}


@pytest.fixture
def patched_var_run(var_root, tmp_path):
    """Run the patched train.py of a plain copy (cwd outside git) with the given extra arguments."""
    import importlib.util
    pytest.importorskip('huggingface_hub', reason="VAR's models import it (pip install huggingface_hub)")
    pytest.importorskip('var_ext.train', reason='var_ext is not installed (it comes with the var branch)')
    from var_tiny import tiny_checkpoints
    repo = fresh_copy(var_root, tmp_path / 'var', keep_git=False)
    patching.apply(repo)
    vae, var = tiny_checkpoints(str(tmp_path))
    paths = [os.path.dirname(os.path.abspath(__file__))]
    if importlib.util.find_spec('torchvision') is None:
        for rel, text in TORCHVISION_STAND_IN.items():
            (tmp_path / 'stand-in' / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / 'stand-in' / rel).write_text(text)
        paths.append(str(tmp_path / 'stand-in'))
    common = ['--ddo=True', f'--var_ckpt={var}', f'--vae_ckpt={vae}', '--depth=2', '--pn=1_2_3_4', '--workers=-1',
              f'--local_out_dir_path={tmp_path / "out"}', '--num-classes', '10', '--vae-vocab', '64', '--vae-ch', '32',
              '--vae-z', '8', '--dataset', 'var_tiny:token_dataset', '--global-batch', '8']

    def run_train(*extra):
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(paths))
        return subprocess.run([sys.executable, str(repo / 'train.py'), *common, *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    return dict(run=run_train, out=tmp_path / 'out', repo=repo, var=var)


def test_var_train_runs_a_ddo_round_from_local_weights(patched_var_run):
    import torch
    alpha = 10.0
    proc = patched_var_run['run'](f'--ddo_alpha={alpha}', '--ddo_beta=0.05', '--iterations', '3', '--seed=3')
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = patched_var_run['out']
    with open(out / 'training_options.json') as f:
        args = json.load(f)
    assert (args['ddo_alpha'], args['ddo_beta'], args['iterations'], args['seed']) == (alpha, 0.05, 3, 3)
    assert args['var_root'] == str(patched_var_run['repo']) and args['ref'] == patched_var_run['var']
    with open(out / 'log.jsonl') as f:
        log = [json.loads(line) for line in f]
    assert [row['iteration'] for row in log] == [1, 2, 3]
    first = log[0]  # target = reference: every sample's discriminator sits at 1/2; alpha = 0 on dropped labels
    assert first['DDO/loss_real'] == pytest.approx(math.log(2), abs=1e-5)
    assert first['DDO/loss_fake'] == pytest.approx(alpha * first['DDO/kept_labels'] * math.log(2), abs=1e-4)
    trained = torch.load(out / 'var-ddo-last.pth', map_location='cpu')
    pretrained = torch.load(patched_var_run['var'], map_location='cpu')
    assert trained.keys() == pretrained.keys() and not torch.equal(trained['head.weight'], pretrained['head.weight'])


@pytest.mark.parametrize('extra, message', [
    (['--bs=64'], 'error: with --ddo=True, use --global-batch instead of --bs'),
    (['--var_ckpt='], 'error: --ddo=True finetunes a pretrained VAR: give --var_ckpt'),
])
def test_var_train_ddo_refuses_bad_options_in_one_line(patched_var_run, extra, message):
    proc = patched_var_run['run'](*extra)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(message), proc.stderr[-2000:]
    assert not patched_var_run['out'].exists()
