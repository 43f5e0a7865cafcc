"""benchmarks/ddo_precision.py: TF32 emulation and the relative error of delta under reduced precision."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'benchmarks'))
from ddo_precision import (
    PRECISIONS,
    Memo,
    deltas,
    perturbed,
    relative_error,
)

from ddo_patch.precision import round_to_bf16, round_to_tf32


def test_round_to_tf32_keeps_ten_mantissa_bits_rounding_to_nearest_even():
    ulp = 2.0 ** -10
    x = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp, 1 + ulp / 4, -(1 + 3 * ulp / 2), 3.14159265])
    assert round_to_tf32(x).tolist() == [1.0, 1 + 2 * ulp, 1 + ulp, 1.0, -(1 + 2 * ulp), 3.140625]
    y = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    r = round_to_tf32(y)
    assert (r.view(torch.int32) & 0x1FFF).eq(0).all()
    assert ((r - y).abs() / y.abs()).max() <= 2.0 ** -11
    assert round_to_tf32(torch.arange(3)).dtype == torch.int64   # other dtypes pass through


def test_tf32_mode_rounds_the_multiplicands_of_matmul_and_convolution():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 32, generator=gen), torch.randn(32, 8, generator=gen)
    bias = torch.randn(8, generator=gen)
    x, w = torch.randn(1, 3, 8, 8, generator=gen), torch.randn(4, 3, 3, 3, generator=gen)
    with PRECISIONS['tf32']():
        mm, addmm, conv = a @ b, torch.addmm(bias, a, b), torch.nn.functional.conv2d(x, w)
        silu = torch.nn.functional.silu(x)
    assert torch.equal(mm, round_to_tf32(a) @ round_to_tf32(b))
    assert torch.equal(addmm, torch.addmm(bias, round_to_tf32(a), round_to_tf32(b)))   # the bias stays fp32
    assert torch.equal(conv, torch.nn.functional.conv2d(round_to_tf32(x), round_to_tf32(w)))
    assert torch.equal(silu, torch.nn.functional.silu(x))                              # elementwise ops untouched
    assert not torch.equal(mm, a @ b)
    with PRECISIONS['bf16']():   # autocast's casts: every input and the output in bf16
        mm, addmm = a @ b, torch.addmm(bias, a, b)
    assert torch.equal(mm, round_to_bf16(round_to_bf16(a) @ round_to_bf16(b)))
    assert torch.equal(addmm, round_to_bf16(torch.addmm(round_to_bf16(bias), round_to_bf16(a), round_to_bf16(b))))
    assert (round_to_bf16(a).view(torch.int32) & 0xFFFF).eq(0).all()


class _Denoiser(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.Conv2d(32, 3, 3, padding=1)

    def forward(self, x, sigma, labels):
        return self.conv2(torch.nn.functional.silu(self.conv1(x)))


def test_delta_error_is_zero_in_fp32_and_grows_near_the_reference():
    ref = _Denoiser(0)
    images = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.5
    near, far = perturbed(ref, 1e-3), _Denoiser(1)
    exact = deltas(near, ref, images, None, 'fp32')
    assert torch.equal(exact, deltas(near, ref, images, None, 'fp32'))   # same sigma and noise: repeatable
    assert relative_error(exact, exact) == 0.0
    errors = {(name, p): relative_error(deltas(theta, ref, images, None, p), deltas(theta, ref, images, None, 'fp32'))
              for name, theta in (('near', near), ('far', far)) for p in ('bf16', 'tf32')}
    for p in ('bf16', 'tf32'):
        assert 0 < errors['far', p] < errors['near', p]       # the closer theta is to ref, the worse
        assert errors['far', p] < 0.1
    assert errors['near', 'tf32'] < errors['near', 'bf16']      # 10 mantissa bits beat 7


def test_the_memoised_reference_gives_the_same_deltas_once_per_precision():
    ref, calls = _Denoiser(0), []
    thetas = (perturbed(ref, 1e-2), _Denoiser(1))
    ref.register_forward_hook(lambda *args: calls.append(1))
    memo = Memo(ref)
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for theta in thetas:
        for precision in ('fp32', 'tf32'):
            memo.key = precision
            assert torch.equal(deltas(theta, memo, images, None, precision), deltas(theta, ref, images, None, precision))
    assert len(calls) == 2 + 4   # memo: once per precision; the direct calls: once each
