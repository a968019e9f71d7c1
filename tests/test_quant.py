"""Tests for toolkit.core.protocol.quant: round-trip error bound, exact zeros, constant channels,
NaN."""

from __future__ import annotations

import pytest
import torch

from toolkit.core.errors import WireError
from toolkit.core.protocol.quant import (
    DEFAULT_SCHEME,
    QuantScheme,
    dequantize,
    max_abs_error,
    quantize,
)

SCHEMES = [
    QuantScheme(bits=b, granularity=g, symmetric=s)
    for b in (2, 4, 8)
    for g in ("per_tensor", "per_channel")
    for s in (False, True)
]


def _ids(s: QuantScheme) -> str:
    return s.scheme_id


def _activation(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Channels spanning six orders of magnitude, as cut layers do.
    mag = torch.logspace(-3, 3, 16).view(1, 16, 1, 1)
    x = torch.randn(4, 16, 6, 6, generator=g) * mag
    if kind == "relu":
        x = torch.relu(x)
    elif kind == "shifted":  # all values far from zero: min > 0
        x = x.abs() + 5 * mag
    return x


def _assert_within_bound(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    q = quantize(x, scheme)
    y = dequantize(q)
    assert y.dtype == torch.float32 and y.shape == x.shape
    bound = max_abs_error(scheme, q)
    # scale/2 plus float32 rounding of a few ulps of the scale.
    excess = (y - x).abs() - bound * (1 + 1e-4)
    assert excess.max().item() <= 0, f"error exceeds scale/2 by {excess.max().item()}"
    return y


@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids)
@pytest.mark.parametrize("kind", ["normal", "relu", "shifted"])
def test_round_trip_error_within_half_scale(scheme: QuantScheme, kind: str) -> None:
    for seed in range(3):
        _assert_within_bound(_activation(kind, seed), scheme)


@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids)
def test_post_relu_zeros_decode_to_exact_zero(scheme: QuantScheme) -> None:
    x = _activation("relu", 7)
    zeros = x == 0
    assert zeros.sum() > x.numel() // 4  # the case we care about: many exact zeros
    y = _assert_within_bound(x, scheme)
    assert torch.equal(y[zeros], torch.zeros(int(zeros.sum())))


@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids)
def test_codes_and_params_have_documented_types(scheme: QuantScheme) -> None:
    x = _activation("normal", 1)
    q = quantize(x, scheme)
    n = 16 if scheme.granularity == "per_channel" else 1
    assert q.codes.dtype == torch.int8 and q.codes.shape == x.shape
    assert q.scale.dtype == torch.float32 and q.scale.shape == (n,)
    assert q.zero_point.dtype == torch.int32 and q.zero_point.shape == (n,)
    assert int(q.codes.min()) >= scheme.qmin and int(q.codes.max()) <= scheme.qmax
    assert bool((q.zero_point >= scheme.qmin).all()) and bool((q.zero_point <= scheme.qmax).all())
    if scheme.symmetric:
        assert not q.zero_point.any()
    assert q.scheme == scheme


def test_affine_uses_full_range_on_post_relu_data() -> None:
    """The point of the default: [0, max] maps onto all 256 levels."""
    x = _activation("relu", 3)
    q = quantize(x, DEFAULT_SCHEME)
    assert torch.equal(q.zero_point, torch.full((16,), -128, dtype=torch.int32))
    assert torch.equal(q.codes.amax(dim=(0, 2, 3)), torch.full((16,), 127, dtype=torch.int8))
    # Symmetric would only reach 127 of the 255 steps: twice the error bound.
    qs = quantize(x, QuantScheme(symmetric=True))
    assert torch.allclose(qs.scale, 2 * q.scale * 255 / 254, rtol=1e-6)


def test_per_channel_beats_per_tensor_on_quiet_channels() -> None:
    x = _activation("normal", 4)
    err_c = (dequantize(quantize(x, QuantScheme())) - x)[:, 0].abs().max()
    err_t = (dequantize(quantize(x, QuantScheme(granularity="per_tensor"))) - x)[:, 0].abs().max()
    assert err_c * 100 < err_t


@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids)
def test_constant_channels_round_trip_exactly(scheme: QuantScheme) -> None:
    x = _activation("relu", 5)
    x[:, 2] = 0.0  # dead ReLU channel
    x[:, 3] = 0.1  # not a power of two, so scale/255 arithmetic would be inexact
    x[:, 4] = -3.7e-5
    x[:, 5] = 1e30
    y = dequantize(quantize(x, scheme))
    if scheme.granularity == "per_channel":
        assert torch.equal(y[:, 2:6], x[:, 2:6])
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("scheme", SCHEMES, ids=_ids)
@pytest.mark.parametrize("value", [0.0, 0.1, -2.5, 3e38, 1e-42])
def test_constant_tensor_round_trips_exactly(scheme: QuantScheme, value: float) -> None:
    x = torch.full((2, 3, 4), value, dtype=torch.float32)
    assert torch.equal(dequantize(quantize(x, scheme)), x)


def test_extreme_ranges_do_not_overflow_or_divide_by_zero() -> None:
    big = torch.tensor([[-3e38, 0.0, 3e38], [3e38, -3e38, 1.0]])  # C = 2 on axis 0
    tiny = torch.tensor([0.0, 1e-44, 2e-44, 3e-44]).view(1, 4)
    for x in (big, tiny):
        for scheme in (QuantScheme(channel_axis=0), QuantScheme(granularity="per_tensor")):
            _assert_within_bound(x, scheme)


def test_channel_axis_is_respected() -> None:
    x = _activation("normal", 6).movedim(1, 3).contiguous()  # NHWC
    q = quantize(x, QuantScheme(channel_axis=3))
    assert q.scale.shape == (16,)
    _assert_within_bound(x, QuantScheme(channel_axis=3))


def test_round_half_to_even() -> None:
    # Per-tensor affine on [0, 255]: scale 1, zero point -128, so x/scale is x itself.
    x = torch.tensor([0.0, 0.5, 1.5, 2.5, 255.0])
    q = quantize(x, QuantScheme(granularity="per_tensor"))
    assert float(q.scale) == 1.0
    assert (q.codes.to(torch.int32) + 128).tolist() == [0, 0, 2, 2, 255]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_rejected(bad: float) -> None:
    x = torch.zeros(2, 3, 4)
    x[1, 2, 3] = bad
    with pytest.raises(WireError, match="NaN or Inf") as exc:
        quantize(x)
    assert exc.value.reason == "nonfinite"


def test_half_precision_input_is_accepted() -> None:
    x = _activation("relu", 8).to(torch.bfloat16)
    y = dequantize(quantize(x))
    assert y.dtype == torch.float32
    assert (y - x.float()).abs().max() <= max_abs_error(DEFAULT_SCHEME, quantize(x)).max()


def test_invalid_inputs_raise_wire_error() -> None:
    with pytest.raises(WireError):
        quantize(torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(WireError):
        quantize(torch.zeros(0, 3))
    with pytest.raises(WireError, match="channel_axis"):
        quantize(torch.zeros(4), QuantScheme(channel_axis=1))
    with pytest.raises(WireError):
        max_abs_error(QuantScheme(bits=4), quantize(torch.ones(2, 2)))


def test_scheme_dict_round_trip_and_id() -> None:
    for scheme in SCHEMES + [QuantScheme(channel_axis=3)]:
        assert QuantScheme.from_dict(scheme.to_dict()) == scheme
    assert DEFAULT_SCHEME.scheme_id == "int8-per_channel-affine"
    assert QuantScheme(bits=4, granularity="per_tensor", symmetric=True).scheme_id == (
        "int4-per_tensor-symmetric"
    )
    assert QuantScheme.from_dict({}) == DEFAULT_SCHEME
    assert (DEFAULT_SCHEME.qmin, DEFAULT_SCHEME.qmax) == (-128, 127)
    assert (QuantScheme(bits=2).qmin, QuantScheme(bits=2).qmax) == (-2, 1)


@pytest.mark.parametrize(
    "bad",
    [
        {"bits": 3},
        {"bits": 16},
        {"bits": True},
        {"bits": "8"},
        {"granularity": "per_row"},
        {"symmetric": 1},
        {"channel_axis": -1},
        {"channel_axis": 8},
        {"channel_axis": 1.0},
        {"granularty": "per_tensor"},
    ],
)
def test_scheme_from_dict_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(WireError) as exc:
        QuantScheme.from_dict(bad)
    assert exc.value.reason == "scheme"
    message = str(exc.value)
    assert message.endswith(".") and message.count(". ") == 0  # one sentence


def test_scheme_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(WireError):
        QuantScheme.from_dict([("bits", 8)])  # type: ignore[arg-type]
