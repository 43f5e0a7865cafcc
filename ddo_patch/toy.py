"""A 2D world with an exact density for the demo: the ground truth, a small EDM denoiser, its sampler.

The ground truth is a mixture of thin, unequal Gaussians on a ring. A small MLP trained by maximum
likelihood (the EDM denoising loss) cannot resolve components that thin: its samples smear across
the gaps between them. That is the failure mode DDO targets (the paper's Figure 2).
"""

from __future__ import annotations

import math

import numpy as np
import torch


class ThinMixture:
    """Mixture of elongated Gaussians on a ring, tangent to it, with unequal weights and widths."""

    def __init__(self, num_components=8, radius=1.0, long_std=0.14, thin_std=0.025, seed=1234):
        rng = np.random.default_rng(seed)
        angles = 2 * np.pi * np.arange(num_components) / num_components
        self.means = radius * np.stack([np.cos(angles), np.sin(angles)], 1)
        weights = rng.uniform(0.4, 1.0, num_components)
        self.weights = weights / weights.sum()
        thin = thin_std * rng.uniform(0.6, 1.4, num_components)
        tangent = np.stack([-np.sin(angles), np.cos(angles)], 1)
        normal = np.stack([np.cos(angles), np.sin(angles)], 1)
        # Covariance = long_std^2 t t^T + thin^2 n n^T: long along the ring, thin across it.
        self.covs = (long_std ** 2 * tangent[:, :, None] * tangent[:, None, :]
                     + thin[:, None, None] ** 2 * normal[:, :, None] * normal[:, None, :])
        self.chols = np.linalg.cholesky(self.covs)
        self.precisions = np.linalg.inv(self.covs)
        self.log_norms = -np.log(2 * np.pi) - 0.5 * np.log(np.linalg.det(self.covs))

    def sample(self, n, seed) -> np.ndarray:
        rng = np.random.default_rng(seed)
        comp = rng.choice(len(self.weights), size=n, p=self.weights)
        eps = rng.standard_normal((n, 2))
        return (self.means[comp] + np.einsum('nij,nj->ni', self.chols[comp], eps)).astype(np.float32)

    def log_prob(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        diff = x[:, None, :] - self.means[None]                              # [N, K, 2]
        maha = np.einsum('nki,kij,nkj->nk', diff, self.precisions, diff)
        comp = np.log(self.weights)[None] + self.log_norms[None] - 0.5 * maha
        top = comp.max(1, keepdims=True)
        return (top + np.log(np.exp(comp - top).sum(1, keepdims=True)))[:, 0]


class ToyDenoiser(torch.nn.Module):
    """EDM-preconditioned denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (Eq. 41-42)
    with F a small MLP. Signature `(x, sigma, labels)` as EDM's networks; labels are ignored."""

    def __init__(self, hidden=64, depth=3, fourier=16, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.register_buffer('freqs', 2 * math.pi * torch.randn(fourier // 2, generator=torch.Generator().manual_seed(0)))
        layers, width = [], 2 + fourier
        for _ in range(depth):
            layers += [torch.nn.Linear(width, hidden), torch.nn.SiLU()]
            width = hidden
        layers.append(torch.nn.Linear(width, 2))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x, sigma, labels=None):
        dtype = self.net[0].weight.dtype
        sigma = sigma.to(torch.float32).reshape(-1, 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        phase = (sigma.log() / 4) * self.freqs[None]                         # c_noise = log(sigma) / 4
        feats = torch.cat([c_in * x.to(torch.float32), phase.cos(), phase.sin()], 1)
        F_x = self.net(feats.to(dtype)).to(torch.float32)
        return c_skip * x.to(torch.float32) + c_out * F_x


def edm_loss(net, x, P_mean, P_std, sigma_data=0.5):
    """The EDM denoising loss (Eq. 43), the MLE objective the demo pretrains with; per sample."""
    sigma = (torch.randn(x.shape[0], 1) * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    noise = torch.randn_like(x) * sigma
    return (weight * (net(x + noise, sigma) - x) ** 2).sum(1)


@torch.no_grad()
def heun_sample(net, n, seed, num_steps=32, sigma_min=0.002, sigma_max=20.0, rho=7.0) -> np.ndarray:
    """EDM's deterministic Heun ODE sampler (Karras et al. 2022, Algorithm 1), seeded."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + steps / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64) * t[0]
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        d_cur = (x - net(x.float(), t_cur.float().expand(n)).double()) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            d_next = (x_next - net(x_next.float(), t_next.float().expand(n)).double()) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.float().numpy()
