"""Integration tests against the real upstream EDM2 code at the pin, on the CPU, at 8x8 pixels.

One module-scoped pipeline: a synthetic labelled data set in EDM2's format -> a short MLE run of the
upstream training loop -> class-balanced reference samples (edm2_ext.generate) -> a DDO run
(edm2_ext.train) stopped after half its duration (--slice) and resumed -> evaluation of its snapshots;
and beside it: a SIGKILLed run resuming, two CPU ranks, the latent-model path, bad inputs. Entry
points run as subprocesses, exactly as users run them, with one CPU thread each (much faster on a
shared machine than torch's default).
"""

import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.upstream

from edm2_helpers import CLASSES, RES, run, subprocess_env, train_mle_snapshot, write_dataset

BATCH, ALPHA, BETA = 16, 2.0, 0.05


@pytest.fixture(scope='module')
def pipeline(edm2_root, world, tmp_path_factory):
    from ddo_patch import upstream
    upstream.activate('edm2', edm2_root)  # the tests below unpickle upstream classes in-process
    root = tmp_path_factory.mktemp('edm2')
    p = dict(root=root, data=world['data'], ddo=str(root / 'ddo'), ref=world['pretrained'])
    p['fake'] = str(root / 'fake.zip')
    run(['-m', 'edm2_ext.generate', '--net', p['ref'], '--outdir', p['fake'], '--seeds', '0-63', '--batch', '32', '--steps', '4'], edm2_root, root)
    p['train_args'] = ['-m', 'edm2_ext.train', '--outdir', p['ddo'], '--data', p['data'], '--ref', p['ref'], '--fake', p['fake'],
                       '--ddo-alpha', str(ALPHA), '--ddo-beta', str(BETA), '--batch', str(BATCH), '--duration', '2048',
                       '--lr', '1e-3', '--rampup', '0', '--status', str(BATCH), '--snapshot', '1Ki', '--checkpoint', '1Ki',
                       '--slice', '1Ki', '--workers', '0']
    p['first_invocation'] = run(p['train_args'], edm2_root, root)
    p['first_files'] = sorted(os.listdir(p['ddo']))
    p['second_invocation'] = run(p['train_args'], edm2_root, root)
    return p


def read_stats(run_dir):
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_generate_writes_a_class_balanced_edm2_dataset(pipeline):
    from training.dataset import ImageFolderDataset
    fake = ImageFolderDataset(path=pipeline['fake'])
    assert len(fake) == 64 and fake.image_shape == [3, RES, RES] and fake.label_dim == CLASSES
    labels = [int(np.argmax(fake.get_label(i))) for i in range(len(fake))]
    assert Counter(labels) == {c: 64 // CLASSES for c in range(CLASSES)}
    assert fake[0][0].dtype == np.uint8
    assert not os.path.exists(pipeline['fake'] + '.partial')


def test_generate_resumes_without_redoing_finished_samples(pipeline, edm2_root, tmp_path):
    out = str(tmp_path / 'fake')
    run(['-m', 'edm2_ext.generate', '--net', pipeline['ref'], '--outdir', out, '--seeds', '0-7', '--steps', '2'], edm2_root, tmp_path)
    first = os.path.join(out, '00000000', 'img00000003.png')
    os.utime(first, (0, 0))  # a finished sample from the "interrupted" run
    run(['-m', 'edm2_ext.generate', '--net', pipeline['ref'], '--outdir', out, '--seeds', '0-15', '--steps', '2'], edm2_root, tmp_path)
    assert os.stat(first).st_mtime == 0
    with open(os.path.join(out, 'dataset.json')) as f:
        assert len(json.load(f)['labels']) == 16


def test_ddo_run_writes_snapshots_stats_and_checkpoints(pipeline):
    assert 'training-state-0000001.pt' in pipeline['first_files']
    assert 'network-snapshot-0000002-0.050.pkl' not in pipeline['first_files']
    files = os.listdir(pipeline['ddo'])
    for kimg in (0, 1, 2):
        assert f'network-snapshot-{kimg:07d}-0.050.pkl' in files
    stats = read_stats(pipeline['ddo'])
    trained = [row for row in stats if 'Loss/loss' in row]
    assert len(trained) == 2048 // BATCH
    for name in ('DDO/loss_real', 'DDO/loss_fake', 'DDO/delta_real', 'DDO/delta_fake', 'DDO/accuracy_real', 'DDO/accuracy_fake'):
        assert all(math.isfinite(row[name]) for row in trained)
    # The first step is at theta = theta_ref: every delta is 0 up to float noise, so the real term is log 2 and the
    # fake term alpha log 2 (the discriminator accuracies are the noise's signs there; test_implicit_... checks them).
    first = trained[0]
    assert first['DDO/loss_real'] == pytest.approx(math.log(2), abs=1e-4)
    assert first['DDO/loss_fake'] == pytest.approx(ALPHA * math.log(2), abs=1e-4)


def test_implicit_discriminator_learns_to_separate_real_from_reference_samples(pipeline):
    """Eq. 10 through the real loop: DDO raises log p_theta / p_ref on real data relative to reference
    samples, so the margin delta_real - delta_fake grows from 0 and the loss falls below (1 + alpha) log 2."""
    trained = [row for row in read_stats(pipeline['ddo']) if 'Loss/loss' in row]
    quarter = len(trained) // 4
    margin = [row['DDO/delta_real'] - row['DDO/delta_fake'] for row in trained]
    early, late = np.mean(margin[:quarter]), np.mean(margin[-quarter:])
    assert late > 0 and late > early
    assert np.mean([row['Loss/loss'] for row in trained[-quarter:]]) < (1 + ALPHA) * math.log(2)


def test_first_step_loss_is_one_plus_alpha_log_2(pipeline):
    first = next(row for row in read_stats(pipeline['ddo']) if 'Loss/loss' in row)
    assert first['Progress/kimg'] == pytest.approx(BATCH / 1000)
    assert first['Loss/loss'] == pytest.approx((1 + ALPHA) * math.log(2), abs=1e-4)  # theta = theta_ref: d = 1/2
    assert abs(first['DDO/delta_real']) < 1e-3 and abs(first['DDO/delta_fake']) < 1e-3


def test_sliced_run_resumes_without_losing_or_repeating_steps(pipeline):
    log = pipeline['second_invocation'].stdout
    assert 'Loading' in log and 'training-state-0000001.pt' in log and 'Training from 1 kimg to 2 kimg' in log
    kimgs = [row['Progress/kimg'] for row in read_stats(pipeline['ddo']) if 'Loss/loss' in row]
    assert kimgs == pytest.approx([BATCH * (i + 1) / 1000 for i in range(len(kimgs))])  # no step lost or repeated
    state = torch.load(os.path.join(pipeline['ddo'], 'training-state-0000002.pt'), map_location='cpu', weights_only=False)
    assert state['loss_fn'] == {'fake_nimg': 2048}  # the fake stream resumed where it stopped, too
    assert state['state']['cur_nimg'] == 2048


def test_sigkilled_run_resumes(pipeline, edm2_root, tmp_path):
    """SIGKILL right after the first checkpoint, rerun the same command: training continues from it."""
    import signal
    import time
    args = list(pipeline['train_args'])
    args[args.index('--outdir') + 1] = out = str(tmp_path / 'killed')
    args[args.index('--duration') + 1] = '64Ki'  # far more than it gets to do before the kill
    args[args.index('--slice') + 1] = '0'
    proc = subprocess.Popen([sys.executable] + args, cwd=tmp_path, env=subprocess_env(edm2_root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = os.path.join(out, 'log.txt')
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(log) and 'training-state-0000001.pt ... done' in open(log).read():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and 'training-state-0000001.pt' in os.listdir(out)
    args[args.index('--slice') + 1] = '1Ki'  # the same command, limited to one more checkpoint interval
    resumed = run(args, edm2_root, tmp_path).stdout
    assert 'Training from 1 kimg to 2 kimg' in resumed
    state = torch.load(os.path.join(out, 'training-state-0000002.pt'), map_location='cpu', weights_only=False)
    assert state['state']['cur_nimg'] == 2048 and state['loss_fn'] == {'fake_nimg': 2048}


@pytest.mark.parametrize('signum', ['SIGUSR1', 'SIGTERM'])
def test_a_signal_writes_the_state_after_the_step_in_progress_and_the_rerun_is_exact(pipeline, edm2_root, tmp_path, signum):
    """A cluster's preemption warning (SIGUSR1) or SIGTERM in the middle of a checkpoint interval: the step in progress
    finishes, the training state is written, exit status 75; rerunning the command ends with the uninterrupted run's
    weights bit for bit. No finished step is lost (stats.jsonl has a row per step: --status is one batch)."""
    import signal
    import time
    from ddo_patch.preemption import EXIT_INTERRUPTED
    args = list(pipeline['train_args'])
    args[args.index('--outdir') + 1] = out = str(tmp_path / 'signalled')
    args[args.index('--slice') + 1] = '0'
    proc = subprocess.Popen([sys.executable] + args, cwd=tmp_path, env=subprocess_env(edm2_root), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and sum('Loss/loss' in row for row in
                                                                 (read_stats(out) if os.path.isfile(os.path.join(out, 'stats.jsonl')) else [])) < 4:
        time.sleep(0.05)
    proc.send_signal(getattr(signal, signum))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, output[-3000:]
    assert f'{signum} received: the step in progress is done' in output
    steps = [row for row in read_stats(out) if 'Loss/loss' in row]
    assert all(row['Faults/nonfinite_steps'] == 0 for row in steps)
    states = sorted(name for name in os.listdir(out) if name.startswith('training-state-'))
    state = torch.load(os.path.join(out, states[-1]), map_location='cpu', weights_only=False)
    assert 4 * BATCH <= state['state']['cur_nimg'] < 2048 and state['state']['cur_nimg'] == BATCH * len(steps)
    assert state['loss_fn'] == {'fake_nimg': state['state']['cur_nimg']} and not any(n.endswith('.tmp') for n in os.listdir(out))
    run(args, edm2_root, tmp_path)
    assert_same_final_weights(out, pipeline['ddo'])


def test_nonfinite_gradients_are_counted_and_too_many_in_a_row_stop_the_run(pipeline, edm2_root, tmp_path):
    """alpha = 1e39 makes every loss infinite: upstream zeroes the gradients, the steps are counted in stats.jsonl
    (Faults/nonfinite_steps), and the third in a row with --max-nonfinite 2 stops the run with one line."""
    args = list(pipeline['train_args'])
    args[args.index('--outdir') + 1] = out = str(tmp_path / 'nan')
    args[args.index('--ddo-alpha') + 1] = '1e39'
    proc = run(args + ['--max-nonfinite', '2'], edm2_root, tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines()[-1] == ('error: 3 consecutive steps had non-finite gradients (upstream zeroed them; '
                                                    'the last ended at 0.048 kimg); the run diverged: lower --lr (or raise --max-nonfinite)')
    assert [row['Faults/nonfinite_steps'] for row in read_stats(out) if 'Loss/loss' in row] == [1, 1]


def assert_same_final_weights(run_dir, other_dir):
    """The kimg-2 snapshots of two runs hold the same EMA weights, bit for bit."""
    name = 'network-snapshot-0000002-0.050.pkl'
    with open(os.path.join(run_dir, name), 'rb') as f, open(os.path.join(other_dir, name), 'rb') as g:
        ours, theirs = pickle.load(f)['ema'].state_dict(), pickle.load(g)['ema'].state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_resumed_run_has_exactly_the_weights_of_an_uninterrupted_one(pipeline, edm2_root, tmp_path):
    """The pipeline's run stopped at its 1Ki checkpoint and resumed (as after a preemption); the same command without
    --slice runs 0 -> 2Ki in one go. Same weights, bit for bit: the resumed run's noise is the uninterrupted one's
    (the reference-sample loader is opened without drawing from the RNG upstream reseeds every step)."""
    args = list(pipeline['train_args'])
    args[args.index('--outdir') + 1] = out = str(tmp_path / 'whole')
    args[args.index('--slice') + 1] = '0'
    assert 'Training from 0 kimg to 2 kimg' in run(args, edm2_root, tmp_path).stdout
    assert_same_final_weights(out, pipeline['ddo'])


def test_a_run_stopped_at_a_rung_continues_as_if_never_stopped(pipeline, edm2_root, tmp_path):
    """A halving rung trains with --duration = the rung; the next stage reruns with the round's --duration and
    resumes there. EDM2's learning rate and EMA do not depend on the total, so the weights equal the pipeline's
    run (which stopped at 1Ki through --slice instead) bit for bit."""
    args = list(pipeline['train_args'])
    args[args.index('--outdir') + 1] = out = str(tmp_path / 'rung')
    args[args.index('--slice') + 1] = '0'
    args[args.index('--duration') + 1] = '1Ki'
    run(args, edm2_root, tmp_path)
    args[args.index('--duration') + 1] = '2048'
    assert 'Training from 1 kimg to 2 kimg' in run(args, edm2_root, tmp_path).stdout
    assert_same_final_weights(out, pipeline['ddo'])


def test_mle_objective_is_the_same_run_with_upstreams_loss(pipeline, edm2_root, tmp_path):
    """`--objective mle`, the matched control, needs no --fake: its first step's loss is upstream's EDM2Loss (round 1's
    P_mean/P_std) of the --ref network in fp32 on the run's first batch and noise, recomputed here; it logs no DDO
    term, its snapshots pickle a plain EDM2Loss, and its dry run counts no reference network."""
    from edm2_ext import presets
    from edm2_ext.loss import MLELoss
    from edm2_ext.network import ddo_network
    from edm2_ext.platform import upstream_compatible
    from torch_utils import misc
    from training.dataset import ImageFolderDataset
    from training.training_loop import EDM2Loss
    args = list(pipeline['train_args'])
    at = args.index('--fake')
    args[at:at + 2] = ['--objective', 'mle']
    args[args.index('--outdir') + 1] = out = str(tmp_path / 'mle')
    args[args.index('--duration') + 1] = args[args.index('--slice') + 1] = '1Ki'
    dry = run(args + ['--dry-run'], edm2_root, tmp_path).stdout
    assert 'MLELoss' in dry and 'adam' in dry and 'reference' not in dry.split('Dry run')[0].splitlines()[-2]
    run(args, edm2_root, tmp_path)
    trained = [row for row in read_stats(out) if 'Loss/loss' in row]
    assert len(trained) == 1024 // BATCH and not any(key.startswith('DDO/') for row in trained for key in row)

    hp = presets.resolve('ddo-img64-s')
    dataset = ImageFolderDataset(path=pipeline['data'], use_labels=True)
    with upstream_compatible(torch.device('cpu')):
        sampler = misc.InfiniteSampler(dataset=dataset, rank=0, num_replicas=1, seed=0)
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=BATCH)))
    net = ddo_network(pipeline['ref'], RES, 3, CLASSES).train()
    misc.set_random_seed(0, 0, 0)   # as upstream's loop seeds the step at cur_nimg 0
    with torch.no_grad():
        loss = MLELoss(P_mean=hp['P_mean'], P_std=hp['P_std'])(net, images.float() / 127.5 - 1, labels)
    assert trained[0]['Loss/loss'] == pytest.approx(float(loss.mean()), rel=1e-5)
    assert trained[-1]['Loss/loss'] != trained[0]['Loss/loss']
    with open(os.path.join(out, 'network-snapshot-0000001-0.050.pkl'), 'rb') as f:
        assert type(pickle.load(f)['loss_fn']) is EDM2Loss


def test_ddo_snapshot_loads_in_upstream_generate_images(pipeline, edm2_root, tmp_path, free_port):
    script = textwrap.dedent('''
        import os, pickle, sys, torch
        sys.path.insert(0, sys.argv[1])
        os.environ.update(MASTER_ADDR='localhost', MASTER_PORT=sys.argv[5], RANK='0', WORLD_SIZE='1')
        torch.distributed.init_process_group('gloo')
        import generate_images
        for _ in generate_images.generate_images(net=sys.argv[2], outdir=sys.argv[4], seeds=[0, 1], num_steps=2,
                                                 device=torch.device('cpu'), verbose=False):
            pass
        for path in sys.argv[2:4]:
            with open(path, 'rb') as f:
                data = pickle.load(f)
            print(type(data['loss_fn']).__name__, data['ema'].use_fp16, data['ema'].unet.enc['8x8_conv'].weight.dtype)
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('edm2_ext', 'ddo_patch')))
    ''')
    snapshot = os.path.join(pipeline['ddo'], 'network-snapshot-0000002-0.050.pkl')
    out = run(['-c', script, str(edm2_root), snapshot, pipeline['ref'], str(tmp_path / 'png'), free_port], edm2_root, tmp_path).stdout.split('\n')
    # An ordinary EDM2 snapshot, loaded without this package, that samples like the reference it came from
    # (fp16 weights and use_fp16 as upstream writes them: fp16 sampling on a GPU), although DDO trained in fp32.
    assert out[:3] == ['EDM2Loss True torch.float16', 'EDM2Loss True torch.float16', '[]']
    assert sorted(os.listdir(tmp_path / 'png')) == ['000000.png', '000001.png']


def test_reference_network_stays_frozen_while_the_target_learns(pipeline):
    from edm2_ext.loss import DDOLoss
    from edm2_ext.network import ddo_network, load_snapshot
    from edm2_ext.platform import upstream_compatible
    from training.dataset import ImageFolderDataset
    torch.manual_seed(0)
    snapshot_params = {k: v.float() for k, v in load_snapshot(pipeline['ref'])['ema'].state_dict().items()}
    data = ImageFolderDataset(path=pipeline['data'])
    images = torch.as_tensor(np.stack([data[i][0] for i in range(8)])).float() / 127.5 - 1
    labels = torch.as_tensor(np.stack([data[i][1] for i in range(8)]))
    net = ddo_network(pipeline['ref'], RES, 3, CLASSES).train().requires_grad_(True)  # as upstream's loop does
    loss_fn = DDOLoss(ref=pipeline['ref'], fake=pipeline['fake'], alpha=ALPHA, beta=BETA)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    with upstream_compatible(torch.device('cpu')):
        for _ in range(3):
            optimizer.zero_grad()
            loss_fn(net, images, labels).mean().backward()
            optimizer.step()
    ref_net = loss_fn.reference_net(torch.device('cpu'))
    assert not ref_net.training and not any(p.requires_grad for p in ref_net.parameters())
    for name, value in ref_net.state_dict().items():
        assert torch.equal(value, snapshot_params[name]), name
    assert not torch.allclose(net.unet.out_gain, snapshot_params['unet.out_gain'])  # the target did learn
    # EDM2's uncertainty head is outside DDO's objective: in the graph (DDP needs it) with exactly zero gradient.
    assert net.logvar_linear.weight.grad is not None and not net.logvar_linear.weight.grad.any()


def test_evaluate_ranks_snapshots(pipeline, edm2_root, tmp_path):
    # Reference statistics of the reference model's own samples: the snapshot at kimg 0 is that model
    # (same seeds, same sampler), so it must come out best with FID ~ 0, and the trained ones worse.
    from training.dataset import ImageFolderDataset
    from edm2_ext.example import PixelProjection
    fake = ImageFolderDataset(path=pipeline['fake'])
    features = PixelProjection()(torch.as_tensor(np.stack([fake[i][0] for i in range(len(fake))]))).numpy()
    with open(tmp_path / 'ref.pkl', 'wb') as f:
        pickle.dump({'fid': dict(mu=features.mean(0), sigma=np.cov(features, rowvar=False))}, f)
    dest = tmp_path / 'fid.json'
    args = ['-m', 'edm2_ext.evaluate', '--net', pipeline['ddo'], '--ref', str(tmp_path / 'ref.pkl'), '--dest', str(dest),
            '--detector', 'fid=edm2_ext.example:PixelProjection', '--seeds', '0-63', '--batch', '32', '--steps', '4']
    first_log = run(args, edm2_root, tmp_path).stdout
    report = json.loads(dest.read_text())
    assert [r['snapshot'] for r in report['results']] == [f'network-snapshot-{k:07d}-0.050.pkl' for k in (0, 1, 2)]
    fids = [r['fid'] for r in report['results']]
    assert abs(fids[0]) < 1e-3 and min(fids[1:]) > 1e-2
    assert report['best']['snapshot'] == 'network-snapshot-0000000-0.050.pkl'
    assert first_log.count('network-snapshot-') >= 3

    # A rerun with the same settings evaluates nothing again and reproduces the report.
    second_log = run(args, edm2_root, tmp_path).stdout
    assert 'fid ' not in second_log and json.loads(dest.read_text()) == report


def test_two_processes_share_the_work(pipeline, edm2_root, tmp_path):
    """torchrun with 2 CPU ranks (gloo): upstream's DDP consistency check passes at the checkpoint and the
    fake stream advances by the global batch."""
    args = list(pipeline['train_args'])
    args[args.index('--outdir') + 1] = out = str(tmp_path / 'ddp')
    args[args.index('--duration') + 1] = '1Ki'
    proc = run(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] + args, edm2_root, tmp_path)
    assert 'world_size": 2' in proc.stdout
    state = torch.load(os.path.join(out, 'training-state-0000001.pt'), map_location='cpu', weights_only=False)
    assert state['loss_fn'] == {'fake_nimg': 1024} and state['state']['cur_nimg'] == 1024
    first = next(row for row in read_stats(out) if 'Loss/loss' in row)
    assert first['Loss/loss'] == pytest.approx((1 + ALPHA) * math.log(2), abs=1e-4)


def test_latent_model_round_trip(edm2_root, tmp_path):
    """The ImageNet-512 path: 8-channel VAE moments as data, a 4-channel latent net, fake latents stored as the
    sampler returns them (no decode/encode), DDO on them. No VAE is needed: only encode_latents runs."""
    data = write_dataset(tmp_path / 'latents', latent=True)
    ref = train_mle_snapshot(data, tmp_path / 'mle', edm2_root)
    fake = str(tmp_path / 'fake.zip')
    run(['-m', 'edm2_ext.generate', '--net', ref, '--outdir', fake, '--seeds', '0-15', '--steps', '3'], edm2_root, tmp_path)

    from ddo_patch import upstream
    upstream.activate('edm2', edm2_root)
    from training.dataset import ImageFolderDataset
    from edm2_ext.generate import sample_latents
    from edm2_ext.network import load_snapshot
    stored = ImageFolderDataset(path=fake)[5][0]
    net = load_snapshot(ref)['ema'].eval()
    expected = sample_latents(net, [5], torch.device('cpu'), num_steps=3)[0].numpy()
    assert stored.dtype == np.float32 and stored.shape == (4, RES, RES)
    np.testing.assert_allclose(stored, expected, atol=1e-3)  # batch-size-level float noise only, no quantisation

    out = str(tmp_path / 'ddo')
    run(['-m', 'edm2_ext.train', '--outdir', out, '--data', data, '--ref', ref, '--fake', fake, '--ddo-alpha', str(ALPHA),
         '--ddo-beta', str(BETA), '--batch', str(BATCH), '--duration', '1Ki', '--lr', '1e-3', '--rampup', '0',
         '--status', str(BATCH), '--snapshot', '1Ki', '--checkpoint', '1Ki', '--workers', '0'], edm2_root, tmp_path)
    assert os.path.isfile(os.path.join(out, 'network-snapshot-0000001-0.050.pkl'))
    first = next(row for row in read_stats(out) if 'Loss/loss' in row)
    assert first['Loss/loss'] == pytest.approx((1 + ALPHA) * math.log(2), abs=1e-4)


def _bad_inputs(p):
    root = p['root']
    if not (root / 'bad').exists():
        os.makedirs(root / 'bad')
        (root / 'bad' / 'not-a-snapshot.pkl').write_bytes(b'not a pickle')
        write_dataset(root / 'bad' / 'fake16', n=8, res=16)
        write_dataset(root / 'bad' / 'fake3classes', n=8, classes=3)
        write_dataset(root / 'bad' / 'unlabelled', n=8, labels=False)
        os.makedirs(root / 'bad' / 'empty-root')
    bad = root / 'bad'
    return {
        'ref is not a snapshot': (['--ref', str(bad / 'not-a-snapshot.pkl')], 'not an EDM2 network snapshot'),
        'fake resolution': (['--fake', str(bad / 'fake16')], '3x16x16'),
        'fake label dim': (['--fake', str(bad / 'fake3classes')], '3 classes'),
        'unlabelled fake': (['--fake', str(bad / 'unlabelled')], 'no labels'),
        'data resolution': (['--data', str(bad / 'fake16')], 'use the data the network was trained on'),
        'alpha < 0': (['--ddo-alpha', '-1'], 'alpha'),
        'beta = 0': (['--ddo-beta', '0'], 'beta'),
        'no upstream': (['--edm2-root', str(bad / 'empty-root')], 'not a checkout of edm2'),
    }


# All cases in one process (each through the entry point's own error handling), instead of one process each.
BAD_INPUT_RUNNER = """
import contextlib, io, json, sys
from ddo_patch.errors import exit_on_user_error
from edm2_ext.train import cmdline
results = {}
for case, args in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            exit_on_user_error(cmdline.main)(args, standalone_mode=False)
            code = 0
        except SystemExit as stop:
            code = stop.code
    results[case] = [code, err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope='module')
def bad_input_results(pipeline, edm2_root, tmp_path_factory):
    root = tmp_path_factory.mktemp('bad-inputs')
    cases = {}
    for case, ((option, value), message) in _bad_inputs(pipeline).items():
        args = list(pipeline['train_args'][2:])   # without '-m edm2_ext.train'
        args[args.index('--outdir') + 1] = str(root / case.replace(' ', '-'))
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
        cases[case] = args
    proc = run(['-c', BAD_INPUT_RUNNER, json.dumps(cases)], edm2_root, root)
    return root, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('case', ['ref is not a snapshot', 'fake resolution', 'fake label dim', 'unlabelled fake',
                                  'data resolution', 'alpha < 0', 'beta = 0', 'no upstream'])
def test_bad_input_is_one_line_and_writes_nothing(pipeline, bad_input_results, case):
    root, results = bad_input_results
    code, stderr = results[case]
    message = _bad_inputs(pipeline)[case][1]
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], stderr
    assert not os.path.exists(root / case.replace(' ', '-'))
