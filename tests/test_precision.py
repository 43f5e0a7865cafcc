"""`ddo_patch.precision`: what each mode does to a step's convolutions and matrix products, forward and backward."""

import pytest
import torch

from ddo_patch.errors import DDOPatchError
from ddo_patch.precision import MODES, Precision, round_to_tf32


def _step(precision):
    """One conv + linear forward under `forward()`, the backward outside it, all under `loop()` (as edm2_ext.train
    nests them); the output and the weight gradients."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    w = torch.randn(4, 3, 3, 3, generator=gen).requires_grad_(True)
    v = torch.randn(5, 144, generator=gen).requires_grad_(True)
    with precision.loop():
        with precision.forward():
            y = torch.nn.functional.conv2d(x, w).flatten(1) @ v.T
        y.float().square().sum().backward()
    return y, w.grad, v.grad


def test_tf32_on_a_cpu_rounds_every_multiplicand_forward_and_backward():
    y, w_grad, v_grad = _step(Precision('tf32', 'cpu'))
    exact_y, exact_w, exact_v = _step(Precision('fp32', 'cpu'))
    gen = torch.Generator().manual_seed(0)
    x, w, v = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(4, 3, 3, 3, generator=gen), torch.randn(5, 144, generator=gen)
    h = round_to_tf32(torch.nn.functional.conv2d(round_to_tf32(x), round_to_tf32(w)).flatten(1))
    emulated = h @ round_to_tf32(v).T   # the same products, in another memory layout: fp32 summation order apart
    assert (y - emulated).abs().max() < 1e-4 < (y - exact_y).abs().max() < 5e-2
    for grad, exact in ((w_grad, exact_w), (v_grad, exact_v)):   # the backward's products are rounded too
        assert y.dtype == grad.dtype == torch.float32 and not torch.equal(grad, exact)
        assert (grad - exact).abs().max() / exact.abs().max() < 5e-3   # TF32's 2^-11 relative rounding, accumulated


@pytest.mark.parametrize('mode, dtype', [('bf16', torch.bfloat16), ('fp16', torch.float16)])
def test_autocast_modes_run_products_in_the_low_dtype_and_keep_fp32_weights_and_gradients(mode, dtype):
    y, w_grad, v_grad = _step(Precision(mode, 'cpu'))
    exact_y, _, _ = _step(Precision('fp32', 'cpu'))
    assert y.dtype == dtype and w_grad.dtype == v_grad.dtype == torch.float32
    assert torch.allclose(y.float(), exact_y, rtol=5e-2, atol=5e-1) and not torch.equal(y.float(), exact_y)


def test_fp32_changes_nothing_and_an_unknown_mode_is_one_line():
    assert MODES == ('fp32', 'tf32', 'bf16', 'fp16')
    with pytest.raises(DDOPatchError, match="unknown precision 'fp8'; choose from fp32, tf32, bf16, fp16"):
        Precision('fp8', 'cpu')
