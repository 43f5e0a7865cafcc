"""The DDO objectives against the paper's math (no upstream needed)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ddo_patch.errors import DDOPatchError
from ddo_patch.losses import (DiffusionDDOLoss, autoregressive_ddo_terms, ddo_objective, ddo_terms, label_dropout_alpha,
                              sequence_log_likelihood)
from ddo_patch.toy import ToyDenoiser, edm_loss

LOG2 = math.log(2)


class TinyImageDenoiser(torch.nn.Module):
    """An image-shaped EDM-style denoiser with optional dropout and a (D, logvar) output."""

    def __init__(self, channels=3, dtype=torch.float32, dropout=0.0, return_logvar=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels + 1, channels, 3, padding=1).to(dtype)
        self.drop = torch.nn.Dropout(dropout)
        self.label_proj = torch.nn.Linear(4, channels).to(dtype)
        self.return_logvar = return_logvar

    def forward(self, x, sigma, labels=None):
        dtype = self.conv.weight.dtype
        sigma = sigma.reshape(-1, 1, 1, 1).to(torch.float32)
        c_in = 1 / (0.25 + sigma ** 2).sqrt()
        h = torch.cat([c_in * x, sigma.log().expand(-1, 1, *x.shape[2:]) / 4], 1).to(dtype)
        out = self.drop(self.conv(h))
        if labels is not None:
            out = out + self.label_proj(labels.to(dtype))[:, :, None, None]
        D = 0.25 / (0.25 + sigma ** 2) * x + (sigma * 0.5 / (0.25 + sigma ** 2).sqrt()) * out.to(torch.float32)
        return (D.to(dtype), torch.zeros(x.shape[0])) if self.return_logvar else D.to(dtype)


def _pair(seed=0, **kw):
    torch.manual_seed(seed)
    net = TinyImageDenoiser(**kw)
    ref = copy.deepcopy(net).eval().requires_grad_(False)
    return net, ref


def _images(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g) * 0.5, torch.randn(n, 3, 8, 8, generator=g) * 0.5


# --- ddo_objective -------------------------------------------------------------------------------

def test_objective_matches_eq13_and_handles_per_sample_alpha():
    delta_real, delta_fake = torch.tensor([0.3, -2.0, 5.0]), torch.tensor([-1.0, 0.5, 2.0])
    alpha, beta = torch.tensor([2.0, 0.0, 1.5]), 0.7
    sig = torch.sigmoid
    expected = -torch.log(sig(beta * delta_real)) - alpha * torch.log(1 - sig(beta * delta_fake))
    torch.testing.assert_close(ddo_objective(delta_real, delta_fake, alpha, beta), expected)


@pytest.mark.parametrize('scale', [1e2, 1e4, 1e6])
def test_objective_finite_for_huge_log_ratios(scale):
    deltas = torch.tensor([-scale, scale], requires_grad=True)
    loss = ddo_objective(deltas, deltas.flip(0), alpha=3.0, beta=1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(deltas.grad).all()
    # Linear tail: -logsigmoid(-s) = s (real side at -scale), alpha*s on the fake side at +scale.
    torch.testing.assert_close(loss, torch.tensor([scale + 3 * scale, 0.0]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('alpha,beta', [(-0.1, 0.02), (1.0, 0.0), (1.0, -1.0), (float('nan'), 0.1), (1.0, float('inf'))])
def test_objective_rejects_invalid_hyperparameters(alpha, beta):
    with pytest.raises(DDOPatchError, match='alpha|beta'):
        ddo_objective(torch.zeros(2), torch.zeros(2), alpha, beta)
    with pytest.raises(DDOPatchError):
        DiffusionDDOLoss(alpha=alpha, beta=beta)


def test_objective_rejects_negative_alpha_tensor_and_unpaired_batches():
    with pytest.raises(DDOPatchError, match='alpha'):
        ddo_objective(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, -1.0]), 0.1)
    with pytest.raises(DDOPatchError, match='pair'):
        ddo_objective(torch.zeros(2), torch.zeros(3), 1.0, 0.1)


# --- Theorems 3.1 and 3.3 on an unconstrained categorical --------------------------------------

def _optimise_exact(p_data, p_ref, alpha, beta, steps=3000):
    """Minimise the exact objective (expectations as sums) over the logits of a free categorical p_theta."""
    logits = p_ref.log().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([logits], lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        log_ratio = logits.log_softmax(0) - p_ref.log()
        # E_data[-log sigma(beta r)] + alpha E_ref[-log(1 - sigma(beta r))]  (Eq. 13, exact expectations)
        loss = (p_data * -F.logsigmoid(beta * log_ratio)).sum() + alpha * (p_ref * -F.logsigmoid(-beta * log_ratio)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return logits.detach().softmax(0)


def _categoricals(k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    p_data = torch.rand(k, generator=g, dtype=torch.float64).pow(3) + 0.01
    p_ref = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
    return p_data / p_data.sum(), p_ref / p_ref.sum()


def test_theorem_3_1_optimum_is_the_data_distribution():
    p_data, p_ref = _categoricals()
    assert 0.5 * (p_data - p_ref).abs().sum() > 0.2  # the reference is clearly wrong to begin with
    p_opt = _optimise_exact(p_data, p_ref, alpha=1.0, beta=1.0)
    assert 0.5 * (p_opt - p_data).abs().sum() < 1e-3


@pytest.mark.parametrize('beta', [0.5, 0.25])
def test_theorem_3_3_optimum_with_alpha_from_eq37(beta):
    p_data, p_ref = _categoricals(seed=1)
    alpha = float(((p_ref ** (1 - 1 / beta)) * p_data ** (1 / beta)).sum() ** beta)  # Eq. 37
    target = p_ref ** (1 - 1 / beta) * p_data ** (1 / beta)
    target = target / target.sum()
    p_opt = _optimise_exact(p_data, p_ref, alpha=alpha, beta=beta)
    assert 0.5 * (p_opt - target).abs().sum() < 1e-3
    assert 0.5 * (p_opt - p_data).abs().sum() > 0.05  # and it overshoots the data, as Theorem 3.3 says


@pytest.mark.parametrize('alpha, beta', [(1.0, 1.0), (50.0, 0.02), (3.0, 0.25)])
def test_at_the_reference_the_gradient_is_beta_half_the_mle_gradient(alpha, beta):
    """Why a converged model gives DDO nothing to do to first order, and why the matched control matters: at theta =
    theta_ref every delta is 0, so dL/dtheta = -(beta/2) E_data[grad log p_theta] + (alpha beta/2) E_ref[grad log p_theta];
    when the reference samples come from p_ref itself (VAR's exact ancestral sampler at cfg 0, not a diffusion sampler
    with its discretisation error) the second expectation is 0, and the gradient is beta/2 times the MLE gradient,
    whatever alpha: a model at its MLE optimum is a stationary point of DDO (exact expectations, a 12-way softmax)."""
    p_data, p_ref = _categoricals(seed=2)
    logits = p_ref.log().clone().requires_grad_(True)
    log_p = logits.log_softmax(0)
    delta = log_p - p_ref.log()
    terms = ddo_terms(delta, delta, alpha, beta)   # every x as a real and as a fake sample
    ddo = (p_data * terms.loss_real).sum() + (p_ref * terms.loss_fake).sum()   # E_data[real term] + E_ref[fake term]
    mle = -(p_data * log_p).sum()
    ddo_grad, = torch.autograd.grad(ddo, logits, retain_graph=True)
    mle_grad, = torch.autograd.grad(mle, logits)
    assert mle_grad.abs().max() > 0.01
    torch.testing.assert_close(ddo_grad, beta / 2 * mle_grad, atol=1e-12, rtol=1e-9)


# --- DiffusionDDOLoss ------------------------------------------------------------------------

def _appendix_d_reference(net, ref_net, images, fake_images, sigma, noise, alpha, beta, labels=None, fake_labels=None):
    """Independent re-derivation of appendix D's code for given draws (sigma, noise), in float64."""
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2

    def logp(model, x, lab):
        D = model(x + noise, sigma, lab)
        D = D[0] if isinstance(D, tuple) else D
        return -(weight.double() * (D.double() - x.double()) ** 2).sum((1, 2, 3))

    D_logp = logp(net, images, labels)
    net.eval()
    D_fake_logp = logp(net, fake_images, fake_labels)
    net.train()
    with torch.no_grad():
        ref_logp, ref_fake_logp = logp(ref_net, images, labels), logp(ref_net, fake_images, fake_labels)
    return -F.logsigmoid(beta * (D_logp - ref_logp)) - alpha * F.logsigmoid(-beta * (D_fake_logp - ref_fake_logp))


def _draws_like(images, P_mean, P_std, seed):
    """The draws DiffusionDDOLoss makes after torch.manual_seed(seed): sigma first, then noise."""
    torch.manual_seed(seed)
    sigma = (torch.randn([images.shape[0], 1, 1, 1]) * P_std + P_mean).exp()
    return sigma, torch.randn_like(images) * sigma


@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize('single_forward', [False, True])
def test_diffusion_loss_equals_appendix_d(dtype, tol, single_forward):
    net, ref = _pair(seed=1, dtype=dtype, return_logvar=True)
    with torch.no_grad():  # make target and reference differ, so the deltas are not zero
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images, fakes = _images(2)
    labels = F.one_hot(torch.arange(6) % 4, 4).float()
    fake_labels = F.one_hot((torch.arange(6) + 1) % 4, 4).float()
    loss_fn = DiffusionDDOLoss(P_mean=-0.4, P_std=1.2, alpha=1.7, beta=0.05, single_forward=single_forward)
    torch.manual_seed(123)
    terms = loss_fn.terms(net, ref, images, fakes, labels, fake_labels)
    sigma, noise = _draws_like(images, -0.4, 1.2, seed=123)
    expected = _appendix_d_reference(net, ref, images, fakes, sigma, noise, 1.7, 0.05, labels, fake_labels)
    assert terms.loss.dtype == torch.float32 and terms.loss.shape == (6,)
    assert terms.delta_real.abs().max() > 1e-3  # a non-trivial comparison
    torch.testing.assert_close(terms.loss.double(), expected, rtol=tol, atol=tol)


def test_diffusion_loss_shares_sigma_and_noise_between_real_and_fake():
    """With fake == real every pair sees the same (sigma, noise), so delta_fake == delta_real exactly."""
    net, ref = _pair(seed=3)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.1)
    images, _ = _images(4)
    terms = DiffusionDDOLoss(alpha=1.0, beta=0.1).terms(net, ref, images, images.clone())
    torch.testing.assert_close(terms.delta_real, terms.delta_fake)
    assert terms.delta_real.abs().min() > 0


def test_diffusion_loss_at_reference_is_log2_and_gradient_has_closed_form():
    """At theta = theta_ref: loss = (1 + alpha) log 2 per sample and
    grad = (beta / 2) (-grad log p(real) + alpha grad log p(fake)), log p = -(weighted denoising error)."""
    alpha, beta = 2.5, 0.04
    net, ref = _pair(seed=4)
    images, fakes = _images(5)
    loss_fn = DiffusionDDOLoss(P_mean=-0.8, P_std=1.6, alpha=alpha, beta=beta)
    torch.manual_seed(7)
    loss = loss_fn(net, ref, images, fakes)
    torch.testing.assert_close(loss, torch.full((6,), (1 + alpha) * LOG2))
    params = list(net.conv.parameters())  # no labels here, so label_proj takes no part
    grads = torch.autograd.grad(loss.sum(), params)

    sigma, noise = _draws_like(images, -0.8, 1.6, seed=7)
    weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    log_p_real = -(weight * (net(images + noise, sigma) - images) ** 2).sum()
    log_p_fake = -(weight * (net(fakes + noise, sigma) - fakes) ** 2).sum()
    closed = torch.autograd.grad((beta / 2) * (-log_p_real + alpha * log_p_fake), params)
    for g, c in zip(grads, closed):
        torch.testing.assert_close(g, c, rtol=1e-4, atol=1e-7)


def test_fake_pass_runs_in_eval_mode_and_mode_is_restored():
    net, ref = _pair(seed=5, dropout=0.5)
    images, _ = _images(6)
    torch.manual_seed(0)
    terms = DiffusionDDOLoss(alpha=1.0, beta=0.1).terms(net, ref, images, images.clone())
    assert net.training
    # Dropout acts on the real pass only: with fake == real the two deltas now differ.
    assert not torch.allclose(terms.delta_real, terms.delta_fake)
    net.eval()
    DiffusionDDOLoss().terms(net, ref, images, images.clone())
    assert not net.training


def test_reference_gets_no_gradient_and_is_unchanged():
    net, ref = _pair(seed=6)
    ref.requires_grad_(True)  # even if the caller forgot to freeze it
    before = copy.deepcopy(ref.state_dict())
    images, fakes = _images(7)
    DiffusionDDOLoss(alpha=1.0, beta=0.1)(net, ref, images, fakes).sum().backward()
    assert all(p.grad is None for p in ref.parameters())
    assert all(p.grad is not None for p in net.conv.parameters())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k])


def test_diffusion_loss_rejects_bad_batches():
    net, ref = _pair()
    images, fakes = _images(8)
    loss_fn = DiffusionDDOLoss()
    with pytest.raises(DDOPatchError, match='same shape'):
        loss_fn(net, ref, images, fakes[:4])
    with pytest.raises(DDOPatchError, match='labels'):
        loss_fn(net, ref, images, fakes, labels=torch.zeros(6, 4))
    bad = fakes.clone()
    bad[0, 0, 0, 0] = float('nan')
    with pytest.raises(DDOPatchError, match='NaN or Inf'):
        loss_fn(net, ref, images, bad)


def test_eq10_sign_one_step_raises_real_elbo_and_lowers_fake_elbo():
    """One SGD step on the DDO loss raises the ELBO (lowers the denoising error) of the real samples and
    lowers it for the fake ones, measured on fixed noise draws."""
    torch.manual_seed(0)
    net = ToyDenoiser(hidden=32)
    ref = copy.deepcopy(net).eval().requires_grad_(False)
    real = torch.randn(512, 2) * 0.3 + torch.tensor([0.5, 0.0])
    fake = torch.randn(512, 2) * 0.3 - torch.tensor([0.5, 0.0])

    def elbo(x):  # -E[weighted denoising error] over fixed draws, up to a constant
        torch.manual_seed(99)
        with torch.no_grad():
            return -edm_loss(net, x.repeat(8, 1), P_mean=-1.0, P_std=1.2).mean()

    before_real, before_fake = elbo(real), elbo(fake)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    DiffusionDDOLoss(P_mean=-1.0, P_std=1.2, alpha=1.0, beta=1.0)(net, ref, real, fake).mean().backward()
    opt.step()
    assert elbo(real) > before_real
    assert elbo(fake) < before_fake


# --- autoregressive side -----------------------------------------------------------------------

def test_sequence_log_likelihood_exact_and_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    tokens = torch.randint(7, (3, 5), generator=g)
    expected = torch.stack([sum(logits[b, l].log_softmax(-1)[tokens[b, l]] for l in range(5)) for b in range(3)])
    torch.testing.assert_close(sequence_log_likelihood(logits, tokens), expected)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = sequence_log_likelihood(logits.bfloat16(), tokens)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=5e-2)
    with pytest.raises(DDOPatchError, match='logits'):
        sequence_log_likelihood(logits, tokens[:, :4])


def test_autoregressive_terms_at_reference_and_label_dropout():
    logp = torch.tensor([-10.0, -20.0, -30.0, -40.0], requires_grad=True)
    dropped = torch.tensor([False, True, False, True])
    alpha = label_dropout_alpha(4.0, dropped)
    torch.testing.assert_close(alpha, torch.tensor([4.0, 0.0, 4.0, 0.0]))
    terms = autoregressive_ddo_terms(logp, logp.detach(), logp * 1.0, logp.detach(), alpha, beta=0.02)
    torch.testing.assert_close(terms.loss, LOG2 * (1 + alpha))
    terms.loss.sum().backward()
    # d/dlogp = -(beta/2) on the real side + alpha (beta/2) on the fake side; no fake push where dropped.
    torch.testing.assert_close(logp.grad, 0.01 * (-1 + alpha))
    acc_real, acc_fake = terms.discriminator_accuracy()
    assert acc_real == 0 and acc_fake == 0  # delta = 0: d = 1/2 is neither side's win


def test_logged_terms_count_saturated_samples_beyond_beta_delta_5():
    """`DDO/saturated_*`: the fraction of samples whose |beta * delta| > 5, where sigmoid's slope is under 3 % of its
    slope at 0; the fake side counts only the samples whose fake term is on (VAR: labels kept)."""
    delta_real = torch.tensor([0.0, 40.0, -60.0, 10.0])
    delta_fake = torch.tensor([-60.0, 60.0, 1.0, -49.0])
    values = ddo_terms(delta_real, delta_fake, alpha=1.0, beta=0.1).log_values(fake_counted=torch.tensor([True, True, True, False]))
    torch.testing.assert_close(values['DDO/saturated_real'], torch.tensor([0.0, 0.0, 1.0, 0.0]))   # 0, 4, -6, 1
    torch.testing.assert_close(values['DDO/saturated_fake'], torch.tensor([1.0, 1.0, 0.0]))        # -6, 6, 0.1 (-4.9 dropped)
    torch.testing.assert_close(values['DDO/accuracy_fake'], torch.tensor([1.0, 0.0, 0.0]))
    assert ddo_terms(delta_real, delta_fake, 1.0, beta=1.0).log_values()['DDO/saturated_real'].tolist() == [0.0, 1.0, 1.0, 1.0]
