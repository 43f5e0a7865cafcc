"""The DDO loss (and the matched control's MLE loss) as upstream's training loop calls a loss:
`loss_fn(net=ddp, images=..., labels=...)`.

Import after `ddo_patch.upstream.activate('edm2')`; named by `loss_kwargs.class_name`.
"""

from __future__ import annotations

import torch

from ddo_patch.losses import DiffusionDDOLoss
from ddo_patch.precision import Precision
from edm2_ext.datasets import fake_to_final, open_dataset
from edm2_ext.network import fp32_without_dropout, load_snapshot
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from training.training_loop import EDM2Loss


def _in_fp32(net):
    """EDM2's Precond called in fp32 whatever its `use_fp16` (DDO trains in fp32; the flag is kept for sampling)."""
    return lambda x, sigma, labels, **kwargs: net(x, sigma, labels, force_fp32=True, **kwargs)


class _KeepLogvar:
    """Calls EDM2's Precond in fp32 with `return_logvar=True` and keeps the log-variance for the caller.

    The uncertainty head (EDM2 Eq. 21) has no part in DDO's objective, but DDP insists that every
    parameter take part in each forward/backward (it raises on the second step otherwise). Adding
    0 * logvar to the loss gives those parameters exact zero gradients, which Adam turns into zero updates.
    """

    def __init__(self, net):
        self.net = net
        self.logvar = None

    def __call__(self, x, sigma, labels):
        denoised, self.logvar = self.net(x, sigma, labels, force_fp32=True, return_logvar=True)
        return denoised


def ddo_loss(ddo: DiffusionDDOLoss, net, ref_net, images, labels, fake_images, fake_labels):
    """(per-sample loss, DDOTerms) of EDM2 Precond `net` against `ref_net` on one real and one fake batch, as
    upstream's loop gets it from `DDOLoss` (also what `edm2_ext.memory` runs on meta tensors)."""
    if labels is None or labels.shape[-1] == 0:
        labels = fake_labels = None
    trained = _KeepLogvar(net)
    terms = ddo.terms(trained, _in_fp32(ref_net), images, fake_images, labels, fake_labels)
    return terms.loss + 0 * trained.logvar.flatten()[:images.shape[0]], terms


class DDOLoss:
    """DDO (Eq. 13 with the diffusion ELBO surrogate of Eq. 44) in place of upstream's `EDM2Loss`.

    Owns what the loop does not know about: the frozen reference network (the `ref` snapshot's EMA net,
    fp32, eval, no grad) and an endless per-rank stream of reference samples from `fake`, one per real
    sample and with its label. The trained net runs once over cat(real, fake) in training mode
    (`single_forward`): EDM2's MPConv renormalises its weights in place on every training-mode forward,
    and DDP expects one forward per backward.

    Reports `DDO/loss_real`, `DDO/loss_fake` (the two terms of Eq. 13), `DDO/delta_real`, `DDO/delta_fake`
    (log p_theta - log p_ref, ELBO surrogate) and `DDO/accuracy_real`, `DDO/accuracy_fake` (discriminator
    d = sigmoid(beta * delta) right on the side) through `training_stats`, so they land in stats.jsonl
    under the names var_ext.train logs too (`DDOTerms.log_values`).

    `precision` (`ddo_patch.precision`): the forward passes of both networks run under that mode's context
    (fp32 by default, as the paper trains).

    Checkpoints (`training-state-*.pt`) keep only the fake-stream position (`state_dict`), so a resumed
    run continues the stream where it stopped. Snapshot pickles get an upstream `EDM2Loss` with the same
    noise distribution in its place (`__reduce__`): a DDO snapshot is an ordinary EDM2 snapshot that
    loads without this package and carries neither the reference network nor the fake set.
    """

    def __init__(self, ref, fake, P_mean=-0.8, P_std=1.6, sigma_data=0.5, alpha=1.0, beta=0.02, use_labels=True,
                 seed=0, loader_kwargs=None, precision='fp32'):
        self.ddo = DiffusionDDOLoss(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data, alpha=alpha, beta=beta, single_forward=True)
        self.ref = ref                              # snapshot path or URL of the reference network
        self.fake = fake                            # EDM2 data set of reference samples
        self.use_labels = use_labels                # read the fake set's labels (class-conditional net)
        self.seed = seed                            # shuffles the fake set, like upstream shuffles the data
        self.loader_kwargs = dict(loader_kwargs or {})  # torch DataLoader options (workers, pinning)
        self.fake_nimg = 0                          # reference samples consumed by all ranks so far
        self.precision = precision                  # `ddo_patch.precision` mode of the forward passes
        self._ref_net = None
        self._fake_iter = None

    def __call__(self, net, images, labels=None):
        fake_images, fake_labels = self._next_fake(images.shape[0], images.device)
        with Precision(self.precision, images.device.type).forward():
            loss, terms = ddo_loss(self.ddo, net, self.reference_net(images.device), images, labels, fake_images, fake_labels)
        for name, values in terms.log_values().items():
            training_stats.report(name, values)
        return loss

    def reference_net(self, device):
        if self._ref_net is None:
            self._ref_net = fp32_without_dropout(load_snapshot(self.ref)['ema']).eval().requires_grad_(False)
        return self._ref_net.to(device)

    def _next_fake(self, batch, device):
        if self._fake_iter is None:
            dataset = open_dataset(self.fake, '--fake', use_labels=self.use_labels)
            sampler = misc.InfiniteSampler(dataset=dataset, rank=dist.get_rank(), num_replicas=dist.get_world_size(),
                                           seed=self.seed, start_idx=self.fake_nimg)
            loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch, **self.loader_kwargs)
            # iter() draws a base seed from the global RNG, which upstream reseeds every step from the image count: a run
            # draws it in its first step, so a resumed run must not draw it again, or its steps' noise differs from the
            # uninterrupted run's (its weights did, by up to 6e-3, before).
            with torch.random.fork_rng(devices=[], enabled=self.fake_nimg > 0):
                self._fake_iter = iter(loader)
        images, labels = next(self._fake_iter)
        if images.shape[0] != batch:
            raise RuntimeError(f'the per-GPU batch changed from {images.shape[0]} to {batch} within a run')
        self.fake_nimg += batch * dist.get_world_size()
        return fake_to_final(images.to(device)), labels.to(device)

    def state_dict(self):
        return dict(fake_nimg=self.fake_nimg)

    def load_state_dict(self, state):
        self.fake_nimg = int(state['fake_nimg'])
        self._fake_iter = None  # reopened at the restored position on the next call

    def __reduce__(self):
        return EDM2Loss, (self.ddo.P_mean, self.ddo.P_std, self.ddo.sigma_data)


class MLELoss(EDM2Loss):
    """The matched control (`--objective mle`): upstream's `EDM2Loss` (denoising score matching with the
    uncertainty weighting of EDM2 Eq. 21) with the round's P_mean/P_std, the network run in fp32 as DDO runs it.

    Snapshot pickles carry a plain `EDM2Loss` in its place (`__reduce__`), as DDO's do. `precision` as DDO's.
    """

    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5, precision='fp32'):
        super().__init__(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)
        self.precision = precision

    def __call__(self, net, images, labels=None):
        with Precision(self.precision, images.device.type).forward():
            return super().__call__(_in_fp32(net), images, labels)

    def __reduce__(self):
        return EDM2Loss, (self.P_mean, self.P_std, self.sigma_data)
