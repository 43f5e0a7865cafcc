"""Building upstream VAR leaves torch's layer initialisation alone and switches every stochastic layer off."""

import pytest
import torch.nn as nn

from var_ext import models
from var_tiny import TINY

pytestmark = pytest.mark.upstream


def test_build_restores_torch_initialisation_and_disables_dropout(var_root):
    classes = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)
    before = {cls: cls.reset_parameters for cls in classes}
    _, var = models.build(TINY, 'cpu')
    assert {cls: cls.reset_parameters for cls in classes} == before
    assert 'reset_parameters' not in nn.Conv2d.__dict__    # upstream's override on the subclass is gone
    layer = nn.Linear(8, 8, bias=False)
    assert layer.weight.abs().sum() > 0 and layer.weight.std() > 0.05   # initialised, not left empty
    assert var.cond_drop_rate == 0 and var.drop_path_rate == 0
    assert all(getattr(m, 'drop_prob', 0) == 0 for m in var.modules())
    assert all(m.p == 0 for m in var.modules() if isinstance(m, nn.Dropout))
