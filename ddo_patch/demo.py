"""`ddo-patch demo`: DDO self-play on a 2D toy with an exact density, on a laptop CPU in minutes.

(a) Pretrain a small EDM denoiser on the thin mixture by MLE (the EDM denoising loss).
(b) Run DDO rounds (section 3.3): the reference is the current model, its samples (EDM Heun ODE) are the
    fake set, `DiffusionDDOLoss` trains a copy with Adam at a small learning rate and large batches, an
    EMA of the weights is evaluated every few steps, and the best EMA of the round becomes the next
    reference (selected on one set of sampling seeds, reported on another, as FID is in the paper).
(c) Print a table per round, write demo.json (a list `rounds`: entry 0 the MLE model, entry k the model
    after round k) and demo.png (samples over the density's contours, metrics per round).

Metrics (each on `num_eval` samples): mean log p_gt of model samples (precision-like, higher is better),
the fraction of samples in low-density regions (below the density that 1% of ground-truth samples fall
under; the ground truth itself scores 0.01), coverage of ground-truth samples by model samples (Naeem et
al. 2020, recall-like), and the Frechet distance to ground-truth samples.

How the recipe and the default alpha were found: docs/demo.md in the repository.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ddo_patch.errors import DDOPatchError
from ddo_patch.files import write_atomic
from ddo_patch.losses import DiffusionDDOLoss, check_hyperparameters
from ddo_patch.metrics import coverage, feature_statistics, frechet_distance
from ddo_patch.toy import ThinMixture, ToyDenoiser, edm_loss, heun_sample


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    rounds: int = 5               # DDO self-play rounds
    alpha: float = 0.5            # weight of the fake term (Eq. 13); 0.5: every round improves (see above)
    beta: float = 1.0             # scale of the log-likelihood ratio (Eq. 13)
    lr: float = 1e-4              # Adam learning rate for DDO: small, as in appendix C
    lr_rampup: int = 100          # linear learning-rate ramp-up in steps, restarted each round (appendix C)
    batch: int = 4096             # real and fake samples per DDO step (each)
    steps_per_round: int = 2000   # DDO steps per round
    eval_every: int = 200         # evaluate the EMA every N steps, keep the round's best
    ema_halflife: int = 100       # EMA half-life in steps
    coverage_guard: float = 0.02  # a candidate may lose at most this much coverage against the reference
    P_mean: float = -2.0          # DDO's log sigma ~ N(P_mean, P_std^2): weighted towards the low noise
    P_std: float = 1.4            # levels that resolve the thin components
    mle_P_mean: float = -1.0      # pretraining's noise distribution
    mle_P_std: float = 1.4
    mle_steps: int = 10000        # MLE pretraining steps
    mle_batch: int = 512
    mle_lr: float = 3e-3
    hidden: int = 64              # MLP width of the denoiser
    num_train: int = 50_000       # ground-truth training set ("the dataset")
    num_fake: int = 20_000        # reference samples per round (offline, as for EDM2)
    num_eval: int = 10_000        # samples per evaluation (select and report sets)
    sampler_steps: int = 32       # Heun steps (63 network evaluations per sample)


PRESETS = {
    'default': DemoConfig(),
    # For tests: the same recipe, fewer rounds and less pretraining.
    'quick': DemoConfig(rounds=3, mle_steps=6000, steps_per_round=300, eval_every=100),
}


class _Evaluator:
    """Scores a model's samples against the ground truth; seeds fix the sampling noise per split."""

    SELECT_SEED, REPORT_SEED = 1_000_003, 2_000_003

    def __init__(self, gt: ThinMixture, cfg: DemoConfig, seed: int):
        self.gt, self.cfg = gt, cfg
        self.real = gt.sample(cfg.num_eval, seed=seed + 2)
        self.threshold = float(np.quantile(gt.log_prob(self.real), 0.01))
        self.real_stats = feature_statistics(self.real)
        self.seed = seed

    def score(self, samples) -> dict:
        log_p = self.gt.log_prob(samples)
        return dict(mean_log_p_gt=float(log_p.mean()),
                    low_density_fraction=float((log_p < self.threshold).mean()),
                    coverage=coverage(self.real, samples),
                    frechet_distance=frechet_distance(*feature_statistics(samples), *self.real_stats))

    def __call__(self, net, split: str):
        base = self.SELECT_SEED if split == 'select' else self.REPORT_SEED
        samples = heun_sample(net, self.cfg.num_eval, seed=base + self.seed, num_steps=self.cfg.sampler_steps)
        return self.score(samples), samples


def _ema_update(ema, net, decay):
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), net.parameters()):
            p_ema.lerp_(p, 1 - decay)


def pretrain(cfg: DemoConfig, train: torch.Tensor) -> ToyDenoiser:
    net = ToyDenoiser(hidden=cfg.hidden)
    ema = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.mle_lr)
    decay = 0.5 ** (1 / 250)
    for _ in tqdm(range(cfg.mle_steps), desc='MLE pretraining', unit='step', leave=False):
        batch = train[torch.randint(len(train), (cfg.mle_batch,))]
        loss = edm_loss(net, batch, cfg.mle_P_mean, cfg.mle_P_std).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _ema_update(ema, net, decay)
    return ema.eval().requires_grad_(False)


def ddo_round(cfg: DemoConfig, ref: ToyDenoiser, train: torch.Tensor, evaluate: _Evaluator, round_idx: int, seed: int):
    """One self-play round against a frozen reference; returns (best EMA, its select-split score, its step)."""
    fake = torch.from_numpy(heun_sample(ref, cfg.num_fake, seed=seed * 1000 + round_idx, num_steps=cfg.sampler_steps))
    net = copy.deepcopy(ref).train().requires_grad_(True)
    ema = copy.deepcopy(ref)
    loss_fn = DiffusionDDOLoss(P_mean=cfg.P_mean, P_std=cfg.P_std, alpha=cfg.alpha, beta=cfg.beta)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    rampup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / cfg.lr_rampup))
    decay = 0.5 ** (1 / cfg.ema_halflife)
    ref_score, _ = evaluate(ref, 'select')
    best = (None, None, 0)
    bar = tqdm(range(1, cfg.steps_per_round + 1), desc=f'DDO round {round_idx}', unit='step', leave=False)
    for step in bar:
        real = train[torch.randint(len(train), (cfg.batch,))]
        fakes = fake[torch.randint(len(fake), (cfg.batch,))]
        terms = loss_fn.terms(net, ref, real, fakes)
        opt.zero_grad(set_to_none=True)
        terms.loss.mean().backward()
        opt.step()
        rampup.step()
        _ema_update(ema, net, decay)
        if step % cfg.eval_every == 0:
            score, _ = evaluate(ema, 'select')
            # Select by precision (mean log p_gt) among candidates that keep their coverage: a sharper
            # model, not a collapsed one. FID plays this role in the paper; here it is too weak a judge.
            keeps_coverage = score['coverage'] >= ref_score['coverage'] - cfg.coverage_guard
            if keeps_coverage and (best[1] is None or score['mean_log_p_gt'] > best[1]['mean_log_p_gt']):
                best = (copy.deepcopy(ema).eval(), score, step)
            bar.set_postfix(loss=f'{terms.loss.mean().item():.4f}', log_p=f"{score['mean_log_p_gt']:.3f}")
    if best[0] is None or best[1]['mean_log_p_gt'] <= ref_score['mean_log_p_gt']:
        return ref, ref_score, 0  # nothing beat the reference: keep it (the paper keeps the best model)
    return best


def _chosen(result) -> str:
    """The table's 'chosen' column: the selected step of the round, or 'kept' when no candidate beat the
    reference (the reference then carries over), or '-' for the MLE model."""
    if result['kind'] == 'mle':
        return '-'
    return 'kept' if result['selected_step'] == 0 else str(result['selected_step'])


def run_demo(outdir='ddo-demo', rounds=None, seed=0, alpha=None, beta=None, preset='default', log=print) -> dict:
    if preset not in PRESETS:
        raise DDOPatchError(f'unknown preset "{preset}"; choose one of {", ".join(PRESETS)}')
    cfg = PRESETS[preset]
    overrides = {k: v for k, v in dict(rounds=rounds, alpha=alpha, beta=beta).items() if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    check_hyperparameters(cfg.alpha, cfg.beta)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    t_start = time.time()
    gt = ThinMixture()
    train = torch.from_numpy(gt.sample(cfg.num_train, seed=seed + 1))
    evaluate = _Evaluator(gt, cfg, seed)
    gt_score = evaluate.score(gt.sample(cfg.num_eval, seed=seed + 3))

    header = f"{'round':>5} {'mean log p_gt':>14} {'low-density':>12} {'coverage':>9} {'Frechet':>9} {'chosen':>6} {'time':>7}"
    log(f'ground truth: mean log p_gt {gt_score["mean_log_p_gt"]:.3f}, low-density {gt_score["low_density_fraction"]:.4f}, '
        f'coverage {gt_score["coverage"]:.3f}')
    model = pretrain(cfg, train)
    score, mle_samples = evaluate(model, 'report')
    results = [dict(round=0, kind='mle', selected_step=None, seconds=time.time() - t_start, **score)]
    log(header)

    def row(r):
        return (f"{r['round']:>5} {r['mean_log_p_gt']:>14.4f} {r['low_density_fraction']:>12.4f} {r['coverage']:>9.4f} "
                f"{r['frechet_distance']:>9.5f} {_chosen(r):>6} {r['seconds']:>6.1f}s")
    log(row(results[0]))
    samples = mle_samples
    for k in range(1, cfg.rounds + 1):
        model, _, step = ddo_round(cfg, model, train, evaluate, k, seed)
        score, samples = evaluate(model, 'report')
        results.append(dict(round=k, kind='ddo', selected_step=step, seconds=time.time() - t_start, **score))
        log(row(results[-1]))

    summary = dict(config=dataclasses.asdict(cfg), preset=preset, seed=seed, ground_truth=gt_score, rounds=results,
                   wall_seconds=time.time() - t_start)
    write_atomic(outdir / 'demo.json', lambda f: f.write(json.dumps(summary, indent=2).encode()))
    write_atomic(outdir / 'demo.png', lambda f: plot_demo(f, gt, mle_samples, samples, results, gt_score))
    first, last = results[0], results[-1]
    log(f'after {cfg.rounds} DDO rounds: mean log p_gt {first["mean_log_p_gt"]:.3f} -> {last["mean_log_p_gt"]:.3f}, '
        f'low-density fraction {first["low_density_fraction"]:.4f} -> {last["low_density_fraction"]:.4f}, '
        f'coverage {first["coverage"]:.3f} -> {last["coverage"]:.3f} ({summary["wall_seconds"]:.0f}s)')
    log(f'wrote {outdir / "demo.json"} and {outdir / "demo.png"}')
    return summary


def plot_demo(file, gt: ThinMixture, mle_samples, final_samples, results, gt_score):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    lim = 1.5
    grid = np.linspace(-lim, lim, 300)
    gx, gy = np.meshgrid(grid, grid)
    log_p = gt.log_prob(np.stack([gx.ravel(), gy.ravel()], 1)).reshape(gx.shape)
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    for ax, samples, title in ((axes[0], mle_samples, 'MLE model (round 0)'),
                               (axes[1], final_samples, f'after DDO round {results[-1]["round"]}')):
        ax.contour(gx, gy, log_p, levels=np.linspace(-6, log_p.max(), 8), cmap='Greys', linewidths=0.7)
        ax.scatter(samples[:4000, 0], samples[:4000, 1], s=1.5, alpha=0.4, color='tab:blue')
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect='equal', title=title, xticks=[], yticks=[])
    rounds = [r['round'] for r in results]
    ax = axes[2]
    ax.plot(rounds, [r['mean_log_p_gt'] for r in results], 'o-', color='tab:blue', label='mean log p_gt (left)')
    ax.axhline(gt_score['mean_log_p_gt'], color='tab:blue', ls=':', lw=1)
    ax.set(xlabel='round (0 = MLE)', ylabel='mean log p_gt of samples', xticks=rounds)
    ax2 = ax.twinx()
    ax2.plot(rounds, [r['low_density_fraction'] for r in results], 's-', color='tab:red', label='low-density fraction (right)')
    ax2.plot(rounds, [1 - r['coverage'] for r in results], '^-', color='tab:green', label='1 - coverage (right)')
    ax2.axhline(gt_score['low_density_fraction'], color='tab:red', ls=':', lw=1)
    ax2.set_ylim(bottom=0)
    ax2.set_ylabel('fraction')
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc='upper center', bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8)
    ax.set_title('metrics per round (dotted: ground truth)')
    fig.tight_layout()
    fig.savefig(file, dpi=110, format='png')
    plt.close(fig)
