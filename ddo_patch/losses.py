"""The DDO objectives (paper: "Direct Discriminative Optimization", ICML 2025).

The discriminator is implicit, d_theta(x) = sigmoid(beta * log p_theta(x) / p_ref(x)) (Eq. 8), so the
whole method is a loss on log-likelihood ratios. `ddo_objective` is that loss (Eq. 13); the diffusion
and autoregressive losses only differ in how they obtain `delta = log p_theta - log p_ref`:

- diffusion: the single-sample ELBO surrogate of Eq. 14-16 with EDM's F-weighting (Eq. 44, appendix D);
- autoregressive: the exact sequence log-likelihood, a sum of token log-probabilities (Eq. 1).

Every function returns per-sample losses; the caller reduces (EDM2's loop sums, VAR's trainer means).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F

from ddo_patch.errors import DDOPatchError

Alpha = Union[float, torch.Tensor]

# What both training entry points (`--objective`) and the round manager's `[control]` can train: 'ddo' (Eq. 13),
# or 'mle', the matched control: the same finetune (init, optimiser, schedule, EMA, batches, evaluation,
# selection) with upstream's own maximum-likelihood loss, which tells DDO's gain from the finetune's.
OBJECTIVES = ('ddo', 'mle')


def check_hyperparameters(alpha: Alpha, beta: float) -> None:
    """Raise a one-line error for alpha < 0 or beta <= 0 (the loss is only a discriminator loss then).

    Meta tensors (`ddo_patch.memory` counts a step's memory on them) have no values to check."""
    if isinstance(alpha, torch.Tensor):
        if not alpha.is_meta and (not bool(torch.isfinite(alpha).all()) or bool((alpha < 0).any())):
            raise DDOPatchError('alpha must be finite and >= 0 for every sample; fix the alpha tensor')
    elif not (math.isfinite(alpha) and alpha >= 0):
        raise DDOPatchError(f'alpha must be a finite number >= 0, got {alpha}; the paper sweeps 0.5-6 (diffusion) and 10-100 (VAR)')
    if not (math.isfinite(beta) and beta > 0):
        raise DDOPatchError(f'beta must be a finite number > 0, got {beta}; the paper uses 0.01-0.1')


def ddo_objective(delta_real: torch.Tensor, delta_fake: torch.Tensor, alpha: Alpha, beta: float) -> torch.Tensor:
    """Per-sample generalised DDO loss, Eq. 13 with 1 - sigmoid(x) = sigmoid(-x):

        -log sigmoid(beta * delta_real) - alpha * log sigmoid(-beta * delta_fake)

    `delta_*` is log p_theta(x) - log p_ref(x) on real data and on reference ("fake") samples, shape [B].
    `alpha` is a float or a per-sample tensor (VAR puts 0 on samples whose label was dropped).
    `logsigmoid` keeps loss and gradient finite for any |beta * delta| (1e4 and beyond).
    """
    return ddo_terms(delta_real, delta_fake, alpha, beta).loss


# |beta * delta| beyond which the implicit discriminator is saturated: sigmoid's slope there is under 3 % of its
# slope at 0 (sigma'(5) = 0.0066 vs 0.25), so a confidently classified sample's gradient has all but vanished.
SATURATION = 5.0


class DDOTerms(NamedTuple):
    """One evaluation of a DDO loss with what a trainer wants to log (all shape [B], fp32)."""
    loss_real: torch.Tensor     # -log sigmoid(beta * delta_real), per sample
    loss_fake: torch.Tensor     # -alpha * log sigmoid(-beta * delta_fake), per sample
    delta_real: torch.Tensor    # log p_theta - log p_ref on real samples (ELBO surrogate for diffusion), detached
    delta_fake: torch.Tensor    # the same on reference samples
    beta: float

    @property
    def loss(self) -> torch.Tensor:
        """The per-sample loss of Eq. 13."""
        return self.loss_real + self.loss_fake

    def discriminator_accuracy(self):
        """Fraction of real samples with d > 1/2 and of fake samples with d < 1/2, d = sigmoid(beta * delta).

        For beta > 0, sigmoid(beta * delta) > 1/2 exactly when delta > 0, so beta is not needed.
        """
        return (self.delta_real > 0).float().mean(), (self.delta_fake < 0).float().mean()

    def log_values(self, fake_counted: torch.Tensor | None = None) -> dict:
        """The terms under the names both adapters log (EDM2's stats.jsonl, VAR's log.jsonl), per sample; the
        diagnostics (`ddo_patch.diagnostics`) read them back.

        `fake_counted` masks the fake samples whose accuracy and saturation count (VAR: those with alpha > 0).
        """
        fake_right = self.delta_fake < 0
        fake_saturated = (self.beta * self.delta_fake).abs() > SATURATION
        if fake_counted is not None:
            fake_right, fake_saturated = fake_right[fake_counted], fake_saturated[fake_counted]
        return {'DDO/loss_real': self.loss_real.detach(), 'DDO/loss_fake': self.loss_fake.detach(),
                'DDO/delta_real': self.delta_real, 'DDO/delta_fake': self.delta_fake,
                'DDO/accuracy_real': (self.delta_real > 0).float(), 'DDO/accuracy_fake': fake_right.float(),
                'DDO/saturated_real': ((self.beta * self.delta_real).abs() > SATURATION).float(),
                'DDO/saturated_fake': fake_saturated.float()}


def ddo_terms(delta_real: torch.Tensor, delta_fake: torch.Tensor, alpha: Alpha, beta: float) -> DDOTerms:
    """`ddo_objective`'s two terms, with the deltas for logging."""
    check_hyperparameters(alpha, beta)
    if delta_real.shape != delta_fake.shape:
        raise DDOPatchError(f'real and fake batches must pair up one to one, got deltas of shape '
                            f'{tuple(delta_real.shape)} and {tuple(delta_fake.shape)}; draw equal-size batches')
    return DDOTerms(-F.logsigmoid(beta * delta_real), -alpha * F.logsigmoid(-beta * delta_fake),
                    delta_real.detach(), delta_fake.detach(), float(beta))


# ------------------------------------------------------------------------------------------------
# Diffusion models (EDM / EDM2 parameterisation, appendix C-D).

def _denoise(net, x, sigma, labels):
    out = net(x, sigma, labels)
    return out[0] if isinstance(out, tuple) else out  # EDM2's Precond may return (D, logvar)


def _weighted_error(denoised, clean, weight):
    """EDM's ||F_theta - F_hat||^2 = lambda(sigma) ||D - x0||^2, summed per sample in fp32 (Eq. 44)."""
    err = weight * (denoised.to(torch.float32) - clean) ** 2
    return err.flatten(1).sum(1)


def _check_finite(name, x):
    if not x.is_meta and not bool(torch.isfinite(x).all()):
        raise DDOPatchError(f'{name} contain NaN or Inf values; check the data pipeline or the reference samples')


class DiffusionDDOLoss:
    """DDO for EDM-preconditioned denoisers: Eq. 44 with the single-sample Jensen bound of Eq. 16.

    Called as `loss(net, ref_net, images, fake_images, labels=None, fake_labels=None) -> [B]`.
    Both networks map `(x, sigma, labels)` to the denoised `D(x)` (or `(D, logvar)`; logvar is ignored).

    For each pair index i one sigma_i (log sigma ~ N(P_mean, P_std^2)) and one noise tensor n_i are drawn
    and shared by real_i and fake_i and by net and ref_net, so that the two ELBO surrogates are compared on
    the same (t, eps) as in appendix D. `delta = -(err_theta - err_ref)`, errors weighted by EDM's
    (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 and summed in fp32 whatever the network's dtype.

    single_forward=False (default) is the paper's code: a training-mode pass on the real batch, an
    eval-mode pass on the fake batch (restoring the previous mode), and the reference under no_grad.
    single_forward=True runs the trained net once, in its current mode, over cat(real, fake), and the
    reference once over the same batch. With dropout off (DDO disables it) the two are the same function,
    and the fused form is faster and is required by networks that mutate their weights in a training-mode
    forward (EDM2's forced weight normalisation) and by DDP, which expects one forward per backward.
    """

    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5, alpha=1.0, beta=0.02, single_forward=False):
        check_hyperparameters(alpha, beta)
        if not P_std > 0 or not sigma_data > 0:
            raise DDOPatchError(f'P_std and sigma_data must be > 0, got {P_std} and {sigma_data}')
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data
        self.alpha = alpha
        self.beta = beta
        self.single_forward = single_forward

    def __call__(self, net, ref_net, images, fake_images, labels=None, fake_labels=None):
        return self.terms(net, ref_net, images, fake_images, labels, fake_labels).loss

    def terms(self, net, ref_net, images, fake_images, labels=None, fake_labels=None) -> DDOTerms:
        if images.shape != fake_images.shape:
            raise DDOPatchError(f'real and fake batches must have the same shape, got {tuple(images.shape)} and '
                                f'{tuple(fake_images.shape)}; draw as many reference samples as real ones per step')
        if (labels is None) != (fake_labels is None):
            raise DDOPatchError('give labels for both the real and the fake batch, or for neither')
        images = images.to(torch.float32)
        fake_images = fake_images.to(torch.float32)
        _check_finite('real images', images)
        _check_finite('fake images', fake_images)

        # One (sigma, noise) per pair index, shared by real/fake and target/reference (appendix D).
        batch = images.shape[0]
        bcast = [batch] + [1] * (images.ndim - 1)
        sigma = (torch.randn(bcast, device=images.device) * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        noise = torch.randn_like(images) * sigma

        if self.single_forward:
            both = torch.cat([images, fake_images])
            both_labels = None if labels is None else torch.cat([labels, fake_labels])
            both_sigma, both_weight = sigma.repeat(2, *bcast[1:]), weight.repeat(2, *bcast[1:])
            noisy = both + noise.repeat(2, *bcast[1:])
            err = _weighted_error(_denoise(net, noisy, both_sigma, both_labels), both, both_weight)
            with torch.no_grad():
                ref_err = _weighted_error(_denoise(ref_net, noisy, both_sigma, both_labels), both, both_weight)
            err_real, err_fake = err.split(batch)
            ref_err_real, ref_err_fake = ref_err.split(batch)
        else:
            err_real = _weighted_error(_denoise(net, images + noise, sigma, labels), images, weight)
            was_training = net.training
            net.eval()
            try:
                err_fake = _weighted_error(_denoise(net, fake_images + noise, sigma, fake_labels), fake_images, weight)
            finally:
                net.train(was_training)
            with torch.no_grad():
                ref_err_real = _weighted_error(_denoise(ref_net, images + noise, sigma, labels), images, weight)
                ref_err_fake = _weighted_error(_denoise(ref_net, fake_images + noise, sigma, fake_labels), fake_images, weight)

        # log p ~ -err (ELBO up to a constant shared by both models, Eq. 14-15).
        delta_real = ref_err_real - err_real
        delta_fake = ref_err_fake - err_fake
        return ddo_terms(delta_real, delta_fake, self.alpha, self.beta)


# ------------------------------------------------------------------------------------------------
# Autoregressive models (VAR, section 5.3).

def sequence_log_likelihood(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) = sum_l log softmax(logits)[l, tokens_l] (Eq. 1), per sample, in fp32.

    logits [B, L, V] (any dtype, also under autocast), tokens [B, L] -> [B] float32.
    """
    if logits.ndim != 3 or tokens.shape != logits.shape[:2]:
        raise DDOPatchError(f'expected logits [B, L, V] and tokens [B, L], got {tuple(logits.shape)} and {tuple(tokens.shape)}')
    batch, length, vocab = logits.shape
    # no autocast on the meta device (ddo_patch.memory), which has none
    with contextlib.nullcontext() if logits.is_meta else torch.autocast(device_type=logits.device.type, enabled=False):
        nll = F.cross_entropy(logits.reshape(-1, vocab).to(torch.float32), tokens.reshape(-1), reduction='none')
    return -nll.view(batch, length).sum(1)


def autoregressive_ddo_terms(logp_real, ref_logp_real, logp_fake, ref_logp_fake, alpha: Alpha, beta: float) -> DDOTerms:
    """DDO from exact sequence log-likelihoods of the target and the (frozen) reference, per sample.

    `alpha` may be a per-sample tensor: VAR trains the unconditional model on dropped-label samples with
    alpha = 0 there (section 5.3), see `label_dropout_alpha`.
    """
    return ddo_terms(logp_real - ref_logp_real.detach(), logp_fake - ref_logp_fake.detach(), alpha, beta)


def label_dropout_alpha(alpha: float, dropped: torch.Tensor) -> torch.Tensor:
    """Per-sample alpha: `alpha` where the class label was kept, 0 where it was dropped (section 5.3)."""
    check_hyperparameters(alpha, 1.0)
    return torch.where(dropped, 0.0, float(alpha)).to(torch.float32)
