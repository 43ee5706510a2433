"""Noise models: exact values where the maths gives them, determinism, validation."""

import math

import pytest
import torch

from spikeguard.perturb import FORMATS, BitFlip, Gaussian, Rounding, Scale, Uniform


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def x():
    return torch.randn(64, 32, generator=gen(123)) * 3


@pytest.mark.parametrize("fmt, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_rounding_equals_torch_cast(x, fmt, dtype):
    q, delta = Rounding(fmt)(x, gen())
    assert torch.equal(delta, x.to(dtype).float() - x)
    assert torch.equal(q, x.to(dtype).float())


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "e4m3", "e5m2"])
def test_rounding_relative_error_within_unit_roundoff(x, fmt):
    u = Rounding(fmt).unit_roundoff
    assert u == FORMATS[fmt][2]
    q, delta = Rounding(fmt)(x, gen())
    # Per-tensor amax scaling puts every |x_j| > amax·2^-6 in the normal range of e4m3.
    normal = x.abs() > x.abs().amax() * 2.0**-6
    assert (delta.abs()[normal] <= u * x.abs()[normal] * (1 + 1e-6)).all()


def test_unit_roundoffs_are_the_formats():
    assert [Rounding(f).unit_roundoff for f in ["bf16", "fp16", "e4m3", "e5m2", "int8"]] == [
        2**-8, 2**-11, 2**-4, 2**-3, None,
    ]


@pytest.mark.parametrize("fmt, fmax", [("e4m3", 448.0), ("e5m2", 57344.0)])
def test_fp8_amax_scaling_maps_amax_to_format_max(fmt, fmax):
    x = torch.tensor([0.5, -2.0, 1.0, 0.0])
    q, _ = Rounding(fmt)(x, gen())
    # amax = 2 maps to fmax exactly and back; 1 and 0.5 are powers of two: exact too.
    assert torch.equal(q, x)
    scaled = torch.tensor([2.0, 1.3])
    q, _ = Rounding(fmt)(scaled, gen())
    assert q[0] == 2.0 and q[1] != 1.3


def test_int8_symmetric_levels():
    x = torch.tensor([1.27, -0.5, 0.004, 0.0])
    q, _ = Rounding("int8")(x, gen())
    s = 1.27 / 127
    expected = torch.round(x / s).clamp(-127, 127) * s
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-7)
    assert q[2] == 0.0  # below half a level


def test_rounding_all_zero_tensor_is_unchanged():
    z = torch.zeros(5)
    for fmt in FORMATS:
        q, delta = Rounding(fmt)(z, gen())
        assert torch.equal(q, z) and torch.equal(delta, z)


def test_bitflip_count_flips_exactly_that_bit():
    x = torch.ones(100)
    q, _ = BitFlip(count=1, bits=[31])(x, gen(5))
    changed = (q != x).nonzero().flatten()
    assert changed.numel() == 1
    assert q[changed].item() == -1.0  # the sign bit of 1.0
    q2, _ = BitFlip(count=1, bits=[31])(x, gen(5))
    assert torch.equal(q, q2)


def test_bitflip_exponent_bit_is_exact_value():
    x = torch.full((10,), 1.5)
    q, delta = BitFlip(count=1, bits=[30])(x, gen(0))
    i = (q != x).nonzero().flatten()
    # 1.5 is 0x3FC00000; flipping bit 30 gives 0x7FC00000, a quiet NaN: compare bit patterns.
    flipped = torch.tensor([0x3FC00000 ^ (1 << 30)], dtype=torch.int32).view(torch.float32)
    assert torch.equal(q[i].view(torch.int32), flipped.view(torch.int32))


def test_bitflip_rate_flips_about_rate_elements_deterministically():
    x = torch.randn(10_000, generator=gen(1))
    q, _ = BitFlip(rate=0.01, bits=list(range(23)))(x, gen(2))
    n = int((q != x).sum())
    assert 60 < n < 140  # Binomial(10000, 0.01): mean 100, sd ~10
    mantissa_only = (q[q != x] / x[q != x])
    assert ((mantissa_only > 0.5) & (mantissa_only < 2)).all()  # mantissa flips keep the octave
    assert torch.equal(q, BitFlip(rate=0.01, bits=list(range(23)))(x, gen(2))[0])
    assert not torch.equal(q, BitFlip(rate=0.01, bits=list(range(23)))(x, gen(3))[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bitflip_half_precision(dtype):
    x = torch.ones(8, dtype=dtype)
    q, _ = BitFlip(count=1, bits=[15])(x, gen())
    assert (q == -1).sum() == 1


def test_scale_channels_and_rate():
    x = torch.ones(2, 3, 4)
    q, delta = Scale(10.0, channels=[1, 3])(x, gen())
    assert torch.equal(q[..., [1, 3]], torch.full((2, 3, 2), 10.0))
    assert torch.equal(q[..., [0, 2]], torch.ones(2, 3, 2))
    assert delta.abs().sum() == 2 * 3 * 2 * 9
    q, _ = Scale(3.0)(x, gen())
    assert torch.equal(q, x * 3)
    q, _ = Scale(3.0, rate=0.5)(torch.ones(1000), gen(4))
    assert 400 < int((q == 3).sum()) < 600


def test_gaussian_absolute_and_relative_scale(x):
    _, delta = Gaussian(0.5)(x, gen())
    assert abs(delta.std().item() - 0.5) < 0.02
    _, delta = Gaussian(0.1, relative=True)(x, gen())
    ratio = delta.norm() / x.norm()
    assert abs(ratio.item() - 0.1) < 0.005  # |δ| ≈ scale·|x|


def test_uniform_relative_is_bounded_elementwise(x):
    _, delta = Uniform(0.05, relative=True)(x, gen())
    assert (delta.abs() <= 0.05 * x.abs()).all()
    _, delta = Uniform(0.3)(x, gen())
    assert delta.abs().max() <= 0.3 and delta.abs().max() > 0.29


def test_magnitude_scales_delta(x):
    q1, d1 = Gaussian(1.0)(x, gen(), 1.0)
    q2, d2 = Gaussian(1.0)(x, gen(), 0.25)
    assert torch.equal(d2, d1 * 0.25) and torch.equal(q2, x + d2)
    _, r1 = Rounding("e4m3")(x, gen(), 1.0)
    q3, r3 = Rounding("e4m3")(x, gen(), 0.5)
    assert torch.equal(r3, r1 * 0.5)


@pytest.mark.parametrize("model", [Gaussian(0.0), Uniform(0.0), BitFlip(rate=0.0), BitFlip(count=0), Scale(1.0)])
def test_identity_models_return_x_itself(model, x):
    x = torch.tensor([-0.0, 1.0])
    q, delta = model(x, gen())
    assert q is x and torch.equal(delta, torch.zeros(2))
    assert model.is_identity


def test_zero_magnitude_returns_x_itself(x):
    q, _ = Gaussian(1.0)(x, gen(), 0.0)
    assert q is x


def test_noise_does_not_touch_global_rng(x):
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    for model in [Gaussian(1.0), Uniform(1.0), BitFlip(rate=0.1), Scale(2.0, rate=0.5), Rounding("e5m2")]:
        model(x, gen())
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Gaussian(-1.0), "Gaussian.scale must be a number >= 0, got -1.0"),
        (lambda: Uniform("a"), "Uniform.scale must be a number >= 0, got 'a'"),
        (lambda: Rounding("fp4"), "Rounding.fmt must be one of ['bf16', 'e4m3', 'e5m2', 'fp16', 'int8'], got 'fp4'"),
        (lambda: BitFlip(), "BitFlip needs exactly one of rate or count, got rate=None, count=None"),
        (lambda: BitFlip(rate=0.1, count=2), "BitFlip needs exactly one of rate or count, got rate=0.1, count=2"),
        (lambda: BitFlip(rate=1.5), "BitFlip.rate must be in [0, 1], got 1.5"),
        (lambda: BitFlip(count=-1), "BitFlip.count must be an int >= 0, got -1"),
        (lambda: BitFlip(count=1, bits=[70]), "BitFlip.bits must be non-empty bit positions in [0, 64), got (70,)"),
        (lambda: Scale("x"), "Scale.factor must be a number, got 'x'"),
        (lambda: Scale(2.0, rate=2), "Scale.rate must be in [0, 1], got 2"),
        (lambda: Scale(2.0, channels=[]), "Scale.channels must be a non-empty list of ints, got ()"),
    ],
)
def test_bad_arguments_name_key_and_value(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert str(err.value) == message


def test_runtime_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"BitFlip.bits \(20,\) exceed the 16 bits of a torch.bfloat16 tensor"):
        BitFlip(count=1, bits=[20])(torch.ones(2, dtype=torch.bfloat16), gen())
    with pytest.raises(TypeError, match="BitFlip supports .* got a torch.int64 tensor"):
        BitFlip(count=1)(torch.ones(2, dtype=torch.int64), gen())
    with pytest.raises(ValueError, match=r"Scale.channels \(5,\) out of range for last dimension 4"):
        Scale(2.0, channels=[5])(torch.ones(2, 4), gen())


def test_e4m3_error_is_relative_not_absolute():
    small = torch.tensor([1e-3, 2e-3, 3.3e-3])
    big = small * 1e4
    _, ds = Rounding("e4m3")(small, gen())
    _, db = Rounding("e4m3")(big, gen())
    assert math.isclose((ds.norm() / small.norm()).item(), (db.norm() / big.norm()).item(), rel_tol=1e-4)
