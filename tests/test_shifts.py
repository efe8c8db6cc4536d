"""Input shifts: determinism, severity order, blend end points, statistics, fit checks, catalogue."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from audit_service.engine.errors import ProbeError, SpecError
from audit_service.engine.shifts import (
    SEVERITIES,
    ProbeStats,
    apply_shift,
    shift_catalogue,
    uniform_noise,
    validate_shift,
)
from audit_service.engine.shifts import functional as Fn
from audit_service.engine.spec import SHIFT_NAMES, ShiftSpec

SEVERITY_SHIFTS = ["gaussian_noise", "blur", "contrast", "brightness", "occlusion"]
IMAGE = (3, 32, 32)


def _gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(64, *IMAGE, generator=_gen(123))


@pytest.fixture(scope="module")
def stats(images) -> ProbeStats:
    return ProbeStats.from_probes(images)


def _all_shifts() -> list[ShiftSpec]:
    return ([ShiftSpec(name=n, severity=s) for n in SEVERITY_SHIFTS for s in (1, 5)]
            + [ShiftSpec(name="blend", beta=0.3), ShiftSpec(name="blend", beta=0.7, target="second_probes")])


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("shift", _all_shifts(), ids=lambda s: s.label)
def test_same_seed_same_result_shape_and_device_kept(shift, images, stats):
    second = torch.rand(10, *IMAGE, generator=_gen(5))
    a = apply_shift(images, shift, stats, _gen(7), second=second)
    b = apply_shift(images, shift, stats, _gen(7), second=second)
    assert torch.equal(a, b)
    assert a.shape == images.shape and a.device == images.device and a.dtype == images.dtype
    assert not torch.equal(a, images)


@pytest.mark.parametrize("name", ["gaussian_noise", "occlusion"])
def test_other_seed_other_result(name, images, stats):
    shift = ShiftSpec(name=name, severity=3)
    assert not torch.equal(apply_shift(images, shift, stats, _gen(1)), apply_shift(images, shift, stats, _gen(2)))


def test_blend_noise_other_seed_other_result(images, stats):
    shift = ShiftSpec(name="blend", beta=0.5)
    assert not torch.equal(apply_shift(images, shift, stats, _gen(1)), apply_shift(images, shift, stats, _gen(2)))


@pytest.mark.parametrize("name", ["blur", "contrast", "brightness"])
def test_deterministic_shifts_ignore_seed(name, images, stats):
    shift = ShiftSpec(name=name, severity=2)
    assert torch.equal(apply_shift(images, shift, stats, _gen(1)), apply_shift(images, shift, stats, _gen(2)))


# ----------------------------------------------------------------------------- severity
@pytest.mark.parametrize("name", SEVERITY_SHIFTS)
def test_severity_is_monotonic(name, images, stats):
    changes = []
    for s in range(1, 6):
        shifted = apply_shift(images, ShiftSpec(name=name, severity=s), stats, _gen(0))
        changes.append(float((shifted - images).abs().mean()))
    assert all(b > a for a, b in zip(changes, changes[1:])), changes
    assert changes[0] > 0


def test_default_severity_is_three(images, stats):
    a = apply_shift(images, ShiftSpec(name="contrast"), stats, _gen())
    b = apply_shift(images, ShiftSpec(name="contrast", severity=3), stats, _gen())
    assert torch.equal(a, b)


def test_gaussian_noise_scale_follows_std(images):
    for scale in (1.0, 10.0):
        x = images * scale
        stats = ProbeStats.from_probes(x)
        noise = apply_shift(x, ShiftSpec(name="gaussian_noise", severity=4), stats, _gen()) - x
        ratio = noise.std(dim=(0, 2, 3)) / stats.std.flatten()
        assert torch.allclose(ratio, torch.full((3,), SEVERITIES["gaussian_noise"][3]), rtol=0.05)


def test_brightness_is_range_relative_and_unclipped(images, stats):
    out = apply_shift(images, ShiftSpec(name="brightness", severity=5), stats, _gen())
    expected = images + 0.3 * (stats.high - stats.low)
    assert torch.allclose(out, expected)
    assert float(out.max()) > float(images.max())  # not clipped to the probe range


def test_contrast_keeps_per_sample_channel_mean(images, stats):
    out = apply_shift(images, ShiftSpec(name="contrast", severity=5), stats, _gen())
    assert torch.allclose(out.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(out.std(dim=(2, 3)), 0.15 * images.std(dim=(2, 3)), rtol=1e-3)


def test_blur_matches_torchvision_and_keeps_constant_images():
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(4, 3, 20, 20, generator=_gen())
    out = apply_shift(x, ShiftSpec(name="blur", severity=3), ProbeStats.from_probes(x), _gen())
    assert torch.allclose(out, TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[1.0, 1.0]))
    const = torch.full((2, 1, 8, 8), 0.7)
    assert torch.allclose(Fn.gaussian_blur(const, 2.0), const)


def test_blur_on_tiny_images():
    x = torch.rand(2, 1, 3, 3)
    out = Fn.gaussian_blur(x, 2.0)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_occlusion_patch_size_and_fill(stats):
    x = torch.rand(16, 3, 40, 40, generator=_gen(3)) + 1.0  # strictly above the fill value 0.5
    fill_stats = ProbeStats(low=torch.full((1, 3, 1, 1), 0.5), high=torch.full((1, 3, 1, 1), 2.0),
                            mean=torch.ones(1, 3, 1, 1), std=torch.ones(1, 3, 1, 1))
    out = apply_shift(x, ShiftSpec(name="occlusion", severity=5), fill_stats, _gen())
    changed = out != x
    assert torch.all(changed.sum(dim=(2, 3)) == 12 * 12)  # side = 0.3 * 40 in every channel of every sample
    assert torch.all(out[changed] == 0.5)
    # the square is at a different place in different samples
    assert len({tuple(torch.nonzero(changed[i, 0])[0].tolist()) for i in range(16)}) > 1


def test_occlusion_mask_is_one_square():
    mask = Fn.occlusion_mask(200, 10, 12, 4, _gen(), torch.device("cpu"))
    assert mask.shape == (200, 10, 12)
    assert torch.all(mask.sum(dim=(1, 2)) == 16)
    rows, cols = mask.any(dim=2), mask.any(dim=1)
    assert torch.all(rows.sum(1) == 4) and torch.all(cols.sum(1) == 4)
    assert mask[:, 0, :].any() and mask[:, -1, :].any() and mask[:, :, 0].any() and mask[:, :, -1].any()


# ----------------------------------------------------------------------------- blend
def test_blend_end_points(images, stats):
    second = torch.rand(64, *IMAGE, generator=_gen(9))
    zero = apply_shift(images, ShiftSpec(name="blend", beta=0.0, target="second_probes"), stats, _gen(), second)
    one = apply_shift(images, ShiftSpec(name="blend", beta=1.0, target="second_probes"), stats, _gen(), second)
    assert torch.equal(zero, images)
    assert torch.equal(one, second)  # same counts: paired row by row
    half = apply_shift(images, ShiftSpec(name="blend", beta=0.5, target="second_probes"), stats, _gen(), second)
    assert torch.allclose(half, 0.5 * images + 0.5 * second)


def test_blend_noise_end_points(images, stats):
    zero = apply_shift(images, ShiftSpec(name="blend", beta=0.0), stats, _gen())
    one = apply_shift(images, ShiftSpec(name="blend", beta=1.0), stats, _gen(4))
    assert torch.equal(zero, images)
    expected = uniform_noise(images.shape[0], IMAGE, stats, _gen(4), "cpu")
    assert torch.equal(one, expected)


@pytest.mark.parametrize("m", [5, 200])
def test_blend_second_rows_cycled_or_sampled(images, stats, m):
    second = torch.arange(m, dtype=torch.float32).reshape(m, 1, 1, 1).expand(m, *IMAGE).contiguous()
    out = apply_shift(images, ShiftSpec(name="blend", beta=1.0, target="second_probes"), stats, _gen(), second)
    ids = out[:, 0, 0, 0].long()
    assert torch.equal(out, second[ids])
    if m < images.shape[0]:
        assert set(ids.tolist()) == set(range(m))  # every second probe used
    else:
        assert len(set(ids.tolist())) == images.shape[0]  # no repeats when there are enough


def test_blend_second_shape_mismatch(images, stats):
    with pytest.raises(ProbeError) as info:
        apply_shift(images, ShiftSpec(name="blend", beta=0.5, target="second_probes"), stats, _gen(),
                    torch.rand(4, 1, 32, 32))
    assert info.value.field == "second_probes"


# ----------------------------------------------------------------------------- statistics & noise
def test_probe_stats_per_channel():
    x = torch.stack([torch.rand(10, 4, 4) * 2 - 1, torch.rand(10, 4, 4) * 5 + 3], dim=1)  # (10, 2, 4, 4)
    stats = ProbeStats.from_probes(x)
    assert stats.low.shape == (1, 2, 1, 1)
    assert torch.allclose(stats.low.flatten(), torch.stack([x[:, 0].min(), x[:, 1].min()]))
    assert torch.allclose(stats.high.flatten(), torch.stack([x[:, 0].max(), x[:, 1].max()]))
    assert torch.allclose(stats.mean.flatten(), torch.stack([x[:, 0].mean(), x[:, 1].mean()]))
    json.dumps(stats.describe())


@pytest.mark.parametrize("shape", [(7,), (5, 6)])
def test_probe_stats_scalar_for_low_rank(shape):
    x = torch.randn(9, *shape)
    stats = ProbeStats.from_probes(x)
    assert stats.low.shape == (1,) * (len(shape) + 1)
    assert float(stats.low) == float(x.min())


def test_probe_stats_constant_channel_fallback():
    x = torch.zeros(4, 2, 3, 3)
    x[:, 1] = torch.rand(4, 3, 3)
    stats = ProbeStats.from_probes(x)
    assert float(stats.std.flatten()[0]) > 0 and float(stats.range.flatten()[0]) > 0
    assert float(stats.low.flatten()[0]) == 0.0 == float(stats.high.flatten()[0])


def test_default_stats():
    stats = ProbeStats.default((1, 28, 28), "cpu")
    assert stats.low.shape == (1, 1, 1, 1)
    assert (float(stats.low), float(stats.high), float(stats.mean)) == (0.0, 1.0, 0.5)
    assert abs(float(stats.std) - 0.29) < 1e-6
    moved = stats.to("cpu", torch.float64)
    assert moved.low.dtype == torch.float64


def test_uniform_noise_within_channel_ranges():
    low = torch.tensor([-2.0, 0.0, 10.0]).reshape(1, 3, 1, 1)
    high = torch.tensor([-1.0, 0.5, 20.0]).reshape(1, 3, 1, 1)
    stats = ProbeStats(low=low, high=high, mean=(low + high) / 2, std=torch.ones(1, 3, 1, 1))
    u = uniform_noise(500, (3, 4, 4), stats, _gen(), "cpu")
    assert u.shape == (500, 3, 4, 4) and u.dtype == torch.float32
    assert torch.all(u >= low) and torch.all(u <= high)
    # fills the range: per-channel min/max close to the bounds
    assert torch.allclose(u.amin(dim=(0, 2, 3)), low.flatten(), atol=0.05 * 10)
    assert torch.allclose(u.amax(dim=(0, 2, 3)), high.flatten(), atol=0.05 * 10)
    assert torch.equal(u, uniform_noise(500, (3, 4, 4), stats, _gen(), "cpu"))


@settings(max_examples=25, deadline=None)
@given(st.floats(-100, 100), st.floats(0.01, 100), st.integers(1, 5))
def test_shifts_scale_with_the_data(offset, scale, severity):
    # an affine change of units moves every shifted input the same way (scale-awareness)
    base = torch.rand(8, 2, 12, 12, generator=_gen(11), dtype=torch.float64)
    x = base * scale + offset
    for name in ("gaussian_noise", "brightness", "contrast", "occlusion", "blur"):
        shift = ShiftSpec(name=name, severity=severity)
        ref = apply_shift(base, shift, ProbeStats.from_probes(base).to("cpu", torch.float64), _gen(3))
        out = apply_shift(x, shift, ProbeStats.from_probes(x).to("cpu", torch.float64), _gen(3))
        assert torch.allclose((out - offset) / scale, ref, atol=1e-4), name


# ----------------------------------------------------------------------------- fit checks
@pytest.mark.parametrize("name", ["blur", "occlusion"])
def test_spatial_shift_needs_image(name):
    with pytest.raises(SpecError) as info:
        validate_shift(ShiftSpec(name=name, severity=2), (10,), has_second_probes=False, field="shifts[1]")
    assert info.value.field == "shifts[1].name"
    assert info.value.message.startswith(f"Expected an input with spatial (H, W) axes (rank >= 2) for the {name}")
    with pytest.raises(SpecError):
        apply_shift(torch.rand(4, 10), ShiftSpec(name=name), ProbeStats.default((10,)), _gen())


@pytest.mark.parametrize("name", ["gaussian_noise", "contrast", "brightness"])
def test_feature_vector_shifts(name):
    validate_shift(ShiftSpec(name=name), (10,), has_second_probes=False)
    x = torch.rand(6, 10)
    out = apply_shift(x, ShiftSpec(name=name), ProbeStats.from_probes(x), _gen())
    assert out.shape == x.shape and not torch.equal(out, x)


def test_blend_second_probes_required():
    shift = ShiftSpec(name="blend", beta=0.5, target="second_probes")
    with pytest.raises(SpecError) as info:
        validate_shift(shift, (1, 8, 8), has_second_probes=False)
    assert info.value.field == "shifts.target"
    validate_shift(shift, (1, 8, 8), has_second_probes=True)
    validate_shift(ShiftSpec(name="blend", beta=0.5), (10,), has_second_probes=False)


# ----------------------------------------------------------------------------- catalogue / devices
def test_catalogue():
    cat = shift_catalogue()
    json.dumps(cat)
    assert [c["name"] for c in cat] == list(SHIFT_NAMES)
    by = {c["name"]: c for c in cat}
    assert by["blur"]["severities"]["5"] == "sigma = 2.0 px"
    assert by["blend"]["parameters"]["beta"]["required"] is True
    for c in cat:
        ShiftSpec(**c["example"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("shift", _all_shifts(), ids=lambda s: s.label)
def test_shifts_on_cuda(shift):
    x = torch.rand(8, 3, 16, 16, device="cuda")
    stats = ProbeStats.from_probes(x)
    second = torch.rand(3, 3, 16, 16, device="cuda")
    a = apply_shift(x, shift, stats, _gen(1, "cuda"), second)
    b = apply_shift(x, shift, stats, _gen(1, "cuda"), second)
    assert a.device.type == "cuda" and torch.equal(a, b)
    u = uniform_noise(4, (3, 16, 16), stats, _gen(1, "cuda"), "cuda")
    assert u.device.type == "cuda"


# ----------------------------------------------------------------------------- the registry
@pytest.fixture
def invert_shift():
    """A toy shift, registered in one place: x -> high + low - x, stronger with the severity."""
    from audit_service.engine.shifts.registry import ShiftKind, register_shift, unregister_shift

    def apply(x, shift, st, generator, second):
        t = kind.parameter(shift)
        return (1 - t) * x + t * (st.high + st.low - x)

    kind = register_shift(ShiftKind("invert", "Mirror the values inside the probes' range", apply,
                                    (0.1, 0.2, 0.3, 0.4, 0.5), "weight {v} on the mirrored input", "any input"))
    yield kind
    unregister_shift("invert")


def test_a_shift_registered_in_one_place_is_found_everywhere(invert_shift, images, stats):
    """One ``register_shift`` call: spec parsing, apply_shift, the default-fit check and the catalogue."""
    from audit_service.engine.shifts import applicable_default_shifts
    from audit_service.engine.spec import parse_audit_spec, shift_names

    spec = parse_audit_spec({"group": "C4", "shifts": [{"name": "invert", "severity": 5}]})
    shift = spec.effective_shifts[0]
    assert shift.label == "invert@5" and "invert" in shift_names() and SEVERITIES["invert"][4] == 0.5
    out = apply_shift(images, shift, stats, _gen())
    mirrored = stats.high + stats.low - images  # (1, C, 1, 1) per channel
    assert torch.allclose(out, 0.5 * images + 0.5 * mirrored, atol=1e-6)
    assert applicable_default_shifts([shift], (10,)) == ([shift], [])  # not spatial: fits a feature vector
    entry = next(c for c in shift_catalogue() if c["name"] == "invert")
    assert entry["severities"]["2"] == "weight 0.2 on the mirrored input" and entry["example"]["severity"] == 3
    with pytest.raises(SpecError) as info:
        parse_audit_spec({"group": "C4", "shifts": [{"name": "invert", "beta": 0.5}]})
    assert "only blend takes it" in info.value.message


def test_an_unregistered_shift_is_refused_again(invert_shift):
    from audit_service.engine.shifts.registry import unregister_shift
    from audit_service.engine.spec import parse_audit_spec

    unregister_shift("invert")
    with pytest.raises(SpecError) as info:
        parse_audit_spec({"group": "C4", "shifts": [{"name": "invert"}]})
    assert info.value.field == "shifts.0.name" and info.value.message.endswith("but got 'invert'")
    assert "invert" not in SEVERITIES and "invert" not in [c["name"] for c in shift_catalogue()]
