"""Group laws and actions, escnn-style: checked over every element of every group."""

from __future__ import annotations

import itertools
import json
from typing import Literal

import pytest
import torch
from pydantic import BaseModel
from hypothesis import given, settings
from hypothesis import strategies as st

from audit_service.engine.errors import SpecError
from audit_service.engine.groups import Element, ExactGroup, Group, build_group, group_catalogue
from audit_service.engine.groups.element import element_from_rearrangement
from audit_service.engine.spec import MAX_GROUP_ORDER, AuditSpec, GroupSpec, GroupSpecModel

IMAGE = (2, 6, 6)

EXACT_SPECS = {
    "C4": ("C4", IMAGE, 4),
    "D4": ("D4", IMAGE, 8),
    "flip_h": ({"name": "flip"}, IMAGE, 2),
    "flip_v": ({"name": "flip", "axis": "vertical"}, IMAGE, 2),
    "translation": ({"name": "translation", "order": 3, "step": 2}, IMAGE, 3),
    "translation_axis0": ({"name": "translation", "order": 2, "step": 1, "axis": 0}, IMAGE, 2),
    "permutation_S3": ({"name": "permutation", "generators": [[1, 2, 0], [1, 0, 2]]}, (3,), 6),
    "product": ({"name": "product", "factors": [{"name": "flip", "axis": "vertical"},
                                                {"name": "translation", "order": 3, "step": 2}]}, IMAGE, 6),
    "product_D4_channels": ({"name": "product", "factors": [
        "D4", {"name": "permutation", "generators": [[1, 0]], "axis": 0}]}, IMAGE, 16),
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=sorted(EXACT_SPECS), ids=str)
def exact_case(request):
    spec, shape, order = EXACT_SPECS[request.param]
    return build_group(spec, shape), shape, order


# ----------------------------------------------------------------------------- group laws
def test_order_and_identity_first(exact_case):
    group, shape, order = exact_case
    assert isinstance(group, ExactGroup) and group.exact
    assert group.order == order == len(group.element_names) == len(group.elements)
    assert group.element_names[0] == "e"
    assert group.elements[0].is_identity()
    x = torch.randn(3, *shape, generator=_gen())
    assert torch.equal(group.orbit(x)[0], x)


def test_closure(exact_case):
    group, _, _ = exact_case
    for a, b in itertools.product(group.elements, repeat=2):
        assert (a @ b) in group, f"{a.name} @ {b.name} is not an element of {group.name}"
    assert group.note is None


def test_inverses_are_elements(exact_case):
    group, _, _ = exact_case
    e = Element.identity(group.size)
    for a in group.elements:
        assert ~a in group
        assert a @ ~a == e and ~a @ a == e


def test_associativity(exact_case):
    group, _, _ = exact_case
    els = group.elements[:6]
    for a, b, c in itertools.product(els, repeat=3):
        assert (a @ b) @ c == a @ (b @ c)


def test_elements_are_distinct(exact_case):
    group, _, _ = exact_case
    assert len({el.key() for el in group.elements}) == group.order


def test_orbit_matches_element_action_and_inverse_is_exact(exact_case):
    group, shape, _ = exact_case
    x = torch.randn(5, *shape, generator=_gen(1))
    orbit = group.orbit(x)
    assert orbit.shape == (group.order, 5, *shape)
    for i, el in enumerate(group.elements):
        assert torch.equal(orbit[i], el.act(x))
        assert torch.equal(orbit[i], el.act(x)), el.name
    assert torch.equal(group.inverse_orbit(orbit), x.expand(group.order, *x.shape))


def test_composition_acts_in_order(exact_case):
    group, shape, _ = exact_case
    x = torch.randn(2, *shape, generator=_gen(2))
    for a, b in itertools.product(group.elements[:4], repeat=2):
        assert torch.equal((a @ b).act(x), a.act(b.act(x)))


def test_inverse_orbit_maps_each_row_back(exact_case):
    group, shape, _ = exact_case
    y = torch.randn(group.order, 3, *shape, generator=_gen(3))
    back = group.inverse_orbit(y)
    for i, el in enumerate(group.elements):
        assert torch.equal(back[i], (~el).act(y[i]))
        assert torch.equal(el.act(back[i]), y[i])


def test_interpolation_error_is_none_for_exact(exact_case):
    group, shape, _ = exact_case
    assert group.interpolation_error(torch.randn(2, *shape)) is None


def test_describe_is_json_ready(exact_case):
    group, _, _ = exact_case
    d = group.describe()
    assert set(d) >= {"name", "order", "exact", "elements", "spec"}
    assert d["order"] == group.order and d["exact"] is True and d["elements"][0] == "e"
    json.dumps(d)


# ----------------------------------------------------------------------------- element values
def test_element_validated_on_construction():
    with pytest.raises(ValueError, match="permutation"):
        Element([0, 0, 1], "bad")
    el = Element([2, 0, 1], "c")
    assert (el @ el @ el).is_identity()
    assert ~el == el @ el
    assert hash(~el) == hash(el @ el)


def test_exact_group_rejects_non_identity_first():
    with pytest.raises(ValueError, match="identity"):
        ExactGroup("bad", [Element([1, 0], "s"), Element([0, 1], "e")], (2,))


# ----------------------------------------------------------------------------- actions
def test_c4_is_rot90():
    g = build_group("C4", (3, 7, 7))
    x = torch.randn(4, 3, 7, 7, generator=_gen())
    orbit = g.orbit(x)
    for k in range(4):
        assert torch.equal(orbit[k], torch.rot90(x, k, dims=(-2, -1)))
    assert g.element_names == ["e", "r90", "r180", "r270"]


def test_c4_on_rank2_input():
    g = build_group("C4", (5, 5))
    x = torch.randn(2, 5, 5)
    assert torch.equal(g.orbit(x)[1], torch.rot90(x, 1, dims=(-2, -1)))


def test_d4_has_eight_distinct_images_and_contains_flips():
    g = build_group("D4", (1, 8, 8))
    x = torch.randn(1, 1, 8, 8, generator=_gen())
    orbit = g.orbit(x)
    assert len({orbit[i].numpy().tobytes() for i in range(8)}) == 8
    images = [o for o in orbit]
    for expected in (torch.flip(x, (-1,)), torch.flip(x, (-2,)), x.transpose(-1, -2), torch.rot90(x, 3, (-2, -1))):
        assert any(torch.equal(o, expected) for o in images)


def test_flip_axes():
    x = torch.randn(3, 2, 4, 5)
    assert torch.equal(build_group({"name": "flip"}, (2, 4, 5)).orbit(x)[1], torch.flip(x, (-1,)))
    assert torch.equal(build_group({"name": "flip", "axis": "vertical"}, (2, 4, 5)).orbit(x)[1], torch.flip(x, (-2,)))


@pytest.mark.parametrize("axis", [-1, -2, 0])
def test_translation_is_roll(axis):
    shape = (3, 9, 9)
    g = build_group({"name": "translation", "order": 3, "step": 3 if axis != 0 else 1, "axis": axis}, shape)
    step = 3 if axis != 0 else 1
    x = torch.randn(4, *shape, generator=_gen())
    orbit = g.orbit(x)
    for k in range(3):
        assert torch.equal(orbit[k], torch.roll(x, k * step, dims=axis % 3 + 1))
    assert g.note is None


def test_translation_paper_t3_is_closed():
    g = build_group({"name": "translation", "order": 3, "step": 12}, (1, 36, 36))
    assert g.order == 3 and g.is_closed() and g.note is None
    assert g.element_names == ["e", "t12", "t24"]
    assert g.name == "translation(order=3, step=12, axis=-1)"


def test_translation_not_closed_is_allowed_with_note():
    g = build_group({"name": "translation", "order": 3, "step": 10}, (1, 28, 28))
    assert g.order == 3
    assert not g.is_closed()
    assert "not a multiple" in g.describe()["note"]


def test_translation_repeated_shifts_note():
    g = build_group({"name": "translation", "order": 4, "step": 2}, (4,))
    assert "distinct" in g.note


def test_translation_on_feature_vector():
    g = build_group({"name": "translation", "order": 5, "step": 2}, (10,))
    x = torch.arange(20.0).reshape(2, 10)
    assert torch.equal(g.orbit(x)[2], torch.roll(x, 4, dims=1))


# ----------------------------------------------------------------------------- permutation groups
def test_permutation_s3_closure():
    g = build_group({"name": "permutation", "generators": [[1, 2, 0], [1, 0, 2]]}, (3,))
    assert g.order == 6
    assert g.is_closed()
    assert g.element_names[0] == "e" and "(0 1 2)" in g.element_names


def test_permutation_five_cycle():
    g = build_group({"name": "permutation", "generators": [[1, 2, 3, 4, 0]]}, (5,))
    assert g.order == 5
    x = torch.arange(5.0).unsqueeze(0)
    assert g.orbit(x)[1].tolist() == [[1.0, 2.0, 3.0, 4.0, 0.0]]


def test_permutation_acts_along_axis():
    g = build_group({"name": "permutation", "generators": [[2, 0, 1]], "axis": 0}, (3, 2, 2))
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(g.orbit(x)[1], x[:, [2, 0, 1]])


def test_permutation_too_large_group():
    # a transposition and an 8-cycle generate S8 (40320 elements); sample = 0 refuses instead of sampling
    gens = [[1, 0, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 0]]
    with pytest.raises(SpecError) as info:
        build_group({"name": "permutation", "generators": gens, "max_order": 100, "sample": 0}, (8,))
    assert info.value.field == "group.max_order"
    assert "more than 100" in info.value.message and "raise `max_order`" in info.value.message
    with pytest.raises(SpecError) as info:
        build_group({"name": "permutation", "generators": gens, "sample": 0}, (8,))
    assert info.value.field == "group.generators"
    assert f"more than {MAX_GROUP_ORDER}" in info.value.message


@pytest.mark.parametrize("bad", [[0, 0, 1], [0, 1], [0, 1, 3]])
def test_permutation_bad_generator(bad):
    with pytest.raises(SpecError) as info:
        build_group({"name": "permutation", "generators": [[1, 2, 0], bad]}, (3,))
    assert info.value.field == "group.generators[1]"
    assert info.value.message.startswith("Expected a permutation of 0..2") and "but got" in info.value.message


@settings(max_examples=30, deadline=None)
@given(st.permutations(list(range(6))), st.permutations(list(range(6))))
def test_permutation_closure_property(p, q):
    g = build_group({"name": "permutation", "generators": [list(p), list(q)]}, (6,))
    gens = [Element(torch.tensor(p), "p"), Element(torch.tensor(q), "q")]
    assert all(s in g for s in gens)
    # a finite set holding e and closed under multiplication by the generators is the generated group
    assert all((el @ s) in g and (s @ el) in g for el in g.elements for s in gens)
    assert 720 % g.order == 0  # Lagrange: a subgroup of S6
    assert len({el.key() for el in g.elements}) == g.order


# ----------------------------------------------------------------------------- products
def test_product_orders_multiply_and_names():
    g = build_group({"name": "product", "factors": ["C4", {"name": "flip"}, {"name": "translation", "order": 3,
                                                                             "step": 2, "axis": 0}]}, (6, 4, 4))
    assert g.order == 4 * 2 * 3
    assert g.name == "C4 x flip(horizontal) x translation(order=3, step=2, axis=0)"
    assert g.element_names[0] == "e"
    assert "r90 @ flip_h @ t2" in g.element_names
    x = torch.randn(2, 6, 4, 4)
    i = g.element_names.index("r90 @ flip_h @ t2")
    expected = torch.rot90(torch.flip(torch.roll(x, 2, dims=1), (-1,)), 1, dims=(-2, -1))
    assert torch.equal(g.orbit(x)[i], expected)


def test_product_non_commuting_factors_note():
    g = build_group({"name": "product", "factors": ["C4", {"name": "translation", "order": 4, "step": 7}]},
                    (1, 28, 28))
    assert g.order == 16
    assert "do not commute" in g.describe()["note"]
    assert not g.is_closed()


def test_product_cap():
    with pytest.raises(SpecError) as info:
        build_group({"name": "product", "factors": ["D4", {"name": "translation", "order": 200}]}, (1, 256, 256))
    assert info.value.field == "group.factors"


def test_product_factor_error_names_factor():
    with pytest.raises(SpecError) as info:
        build_group({"name": "product", "factors": ["flip", {"name": "translation", "order": 2, "step": 40}]},
                    (1, 28, 28))
    assert info.value.field == "group.factors[1].step"


# ----------------------------------------------------------------------------- fit errors
def test_c4_non_square():
    with pytest.raises(SpecError) as info:
        build_group("C4", (1, 28, 32))
    assert info.value.field == "group"
    assert info.value.message.startswith("Expected a square image for C4 rotations, but the model's input is 1x28x32")


@pytest.mark.parametrize("name", ["C4", "D4", "rotation", "flip"])
def test_image_groups_need_rank2(name):
    with pytest.raises(SpecError, match="Expected an image input") as info:
        build_group(name, (10,))
    assert info.value.field == "group"


def test_translation_step_too_large():
    with pytest.raises(SpecError) as info:
        build_group({"name": "translation", "order": 2, "step": 28}, (1, 28, 28))
    assert info.value.field == "group.step"
    assert "Expected `step` smaller than" in info.value.message and "but got 28" in info.value.message


@pytest.mark.parametrize("axis", [3, -4])
def test_translation_bad_axis(axis):
    with pytest.raises(SpecError) as info:
        build_group({"name": "translation", "order": 2, "axis": axis}, (1, 28, 28))
    assert info.value.field == "group.axis"
    assert f"but got {axis}" in info.value.message


def test_unknown_group_name():
    with pytest.raises(SpecError) as info:
        build_group({"name": "SO3"}, (1, 8, 8))
    assert info.value.field.startswith("group")


# ----------------------------------------------------------------------------- sampled rotation
def test_rotation_is_inexact_with_positive_bilinear_error():
    g = build_group({"name": "rotation", "n_angles": 8}, (1, 16, 16))
    assert not g.exact and g.order == 8
    assert g.element_names[:3] == ["e", "rot45", "rot90"]
    x = torch.rand(6, 1, 16, 16, generator=_gen())
    err = g.interpolation_error(x)
    assert err is not None and 0.05 < err < 1.0
    assert g.describe()["exact"] is False


def test_rotation_nearest_multiples_of_90_are_exact():
    g = build_group({"name": "rotation", "n_angles": 4, "interpolation": "nearest"}, (2, 9, 9))
    x = torch.rand(3, 2, 9, 9, generator=_gen())
    assert g.interpolation_error(x) < 1e-6
    assert torch.allclose(g.orbit(x), build_group("C4", (2, 9, 9)).orbit(x))


def test_rotation_matches_torchvision():
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    g = build_group({"name": "rotation", "n_angles": 6}, (3, 11, 11))
    x = torch.rand(2, 3, 11, 11, generator=_gen())
    orbit = g.orbit(x)
    for k in range(6):
        ref = F.rotate(x, 60.0 * k, interpolation=InterpolationMode.BILINEAR)
        assert torch.allclose(orbit[k], ref, atol=1e-5)


def test_rotation_inverse_round_trip_on_the_inscribed_disk():
    # smooth image: bilinear round trips are close inside the disk that never leaves the frame
    n = 32
    yy, xx = torch.meshgrid(torch.arange(n) - (n - 1) / 2, torch.arange(n) - (n - 1) / 2, indexing="ij")
    disk = (xx**2 + yy**2) < (n / 2 - 2) ** 2
    x = torch.exp(-(xx**2 + yy**2) / 60.0).reshape(1, 1, n, n)
    g = build_group({"name": "rotation", "n_angles": 12}, (1, n, n))
    back = g.inverse_orbit(g.orbit(x))
    assert torch.equal(back[0], x)
    assert torch.allclose(back[:, :, :, disk], x[:, :, disk].expand(12, 1, 1, -1), atol=2e-2)


def test_rotation_inverse_orbit_rotates_back():
    g = build_group({"name": "rotation", "n_angles": 4, "interpolation": "nearest"}, (1, 6, 6))
    y = torch.randn(4, 2, 1, 6, 6)
    back = g.inverse_orbit(y)
    for k in range(4):
        assert torch.allclose(back[k], torch.rot90(y[k], -k, dims=(-2, -1)))


def test_product_with_rotation_chains_actions():
    spec = {"name": "product", "factors": [{"name": "rotation", "n_angles": 4, "interpolation": "nearest"},
                                           {"name": "flip", "axis": "vertical"}]}
    g = build_group(spec, (1, 8, 8))
    exact = build_group({"name": "product", "factors": ["C4", {"name": "flip", "axis": "vertical"}]}, (1, 8, 8))
    assert not g.exact and g.order == 8
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(g.orbit(x), exact.orbit(x))
    y = torch.rand(8, 3, 1, 8, 8)
    assert torch.allclose(g.inverse_orbit(y), exact.inverse_orbit(y))
    assert g.interpolation_error(x) < 1e-6


# ----------------------------------------------------------------------------- misc
def test_shape_checks():
    g = build_group("C4", (1, 4, 4))
    with pytest.raises(ValueError, match="Expected probes"):
        g.orbit(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="G = 4"):
        g.inverse_orbit(torch.randn(3, 2, 1, 4, 4))


def test_orbit_keeps_dtype_and_batches_large_inputs():
    g = build_group("D4", (3, 32, 32))
    x = torch.randn(256, 3, 32, 32, dtype=torch.float64)
    orbit = g.orbit(x)
    assert orbit.dtype == torch.float64 and orbit.shape == (8, 256, 3, 32, 32)
    assert torch.equal(orbit[5], g.elements[5].act(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_orbit_on_cuda():
    g = build_group("D4", (1, 8, 8))
    x = torch.randn(4, 1, 8, 8, device="cuda")
    orbit = g.orbit(x)
    assert orbit.device.type == "cuda"
    assert torch.equal(orbit.cpu(), g.orbit(x.cpu()))
    assert torch.equal(g.inverse_orbit(orbit), x.expand(8, *x.shape))


def test_catalogue_lists_every_group():
    cat = group_catalogue()
    names = [c["name"] for c in cat]
    assert names == ["C4", "D4", "flip", "translation", "permutation", "rotation", "product"]
    json.dumps(cat)
    by = {c["name"]: c for c in cat}
    assert by["translation"]["parameters"]["step"]["default"] == 1
    assert by["translation"]["parameters"]["order"]["required"] is True
    assert by["rotation"]["exact"] is False
    for c in cat:  # every example builds on a fitting input
        shape = (3,) if c["name"] == "permutation" else (3, 36, 36)
        group = build_group(c["example"], shape)
        assert isinstance(group, Group) and group.order >= 2


def test_product_cap_with_permutation_factor_checked_after_closure():
    s5 = {"name": "permutation", "generators": [[1, 0, 2, 3, 4], [1, 2, 3, 4, 0]], "axis": 0}
    with pytest.raises(SpecError) as info:
        build_group({"name": "product", "factors": [s5, {"name": "translation", "order": 9}]}, (5, 9, 9))
    assert info.value.field == "group.factors" and "1080" in info.value.message


def test_element_rejects_out_of_range():
    with pytest.raises(ValueError):
        Element([0, 1, 3], "bad")
    with pytest.raises(ValueError):
        Element([-1, 0, 1], "bad")


def test_orbit_size_cap():
    with pytest.raises(SpecError) as info:
        build_group("D4", (3, 4096, 4096))
    assert info.value.field == "group" and "order x input size" in info.value.message


def test_from_table_validates():
    with pytest.raises(ValueError, match="permutation"):
        ExactGroup.from_table("bad", torch.tensor([[0, 1, 2], [0, 0, 1]]), ["e", "x"], (3,))
    g = ExactGroup.from_table("swap", torch.tensor([[0, 1], [1, 0]]), ["e", "s"], (2,))
    assert g.is_closed() and torch.equal(g.orbit(torch.tensor([[1.0, 2.0]]))[1], torch.tensor([[2.0, 1.0]]))


@pytest.mark.parametrize("gens, order, symmetric", [
    ([[1, 0, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 0]], 40320, True),           # S8
    ([[1, 2, 3, 0, 4, 5, 6, 7], [0, 1, 2, 3, 5, 6, 7, 4], [4, 5, 6, 7, 0, 1, 2, 3],  # S4 wr C2: not symmetric
      [1, 0, 2, 3, 4, 5, 6, 7]], 1152, False),
])
def test_groups_past_the_cap_are_sampled_uniformly_and_seeded(gens, order, symmetric):
    spec = {"name": "permutation", "generators": gens, "max_order": 1000, "sample": 64, "seed": 3}
    g = build_group(spec, (8,))
    assert g.order == 64 and g.exact and g.sampled["group_order"] == order and g.sampled["size"] == 64
    assert ("symmetric" in g.sampled["method"]) == symmetric
    table = torch.stack([el.perm for el in g.elements])
    assert torch.equal(table[0], torch.arange(8)) and len({tuple(r.tolist()) for r in table}) == 64
    assert "drawn uniformly" in g.describe()["note"] and g.describe()["sampled"]["seed"] == 3
    again = build_group(spec, (8,))
    assert torch.equal(table, torch.stack([el.perm for el in again.elements]))  # seeded
    if not symmetric:  # every sampled element lies in the group: it preserves the blocks {0..3}, {4..7}
        blocks = [{0, 1, 2, 3}, {4, 5, 6, 7}]
        for row in table.tolist():
            assert {row[i] for i in range(4)} in blocks


def test_one_record_per_group_name():
    """Every group the spec accepts has exactly one registry record (spec model, builder, catalogue entry)."""
    from audit_service.engine.groups.build import GROUPS, group_catalogue
    from audit_service.engine.spec import GROUP_NAMES, GROUP_SPEC_MODELS

    assert list(GROUPS) == list(GROUP_NAMES) == list(GROUP_SPEC_MODELS)
    assert all(GROUP_SPEC_MODELS[name] is record.spec for name, record in GROUPS.items())
    assert [e["name"] for e in group_catalogue()] == list(GROUPS)
    for name, record in GROUPS.items():
        assert record.name == name
        assert record.spec.model_validate(record.example)  # the catalogue's example is a valid spec


class ReverseSpec(GroupSpecModel):
    """A toy group: reading one axis backwards (order 2)."""

    name: Literal["reverse"]
    axis: int = -1

    def known_order(self) -> int | None:
        return 2


def _build_reverse(spec: ReverseSpec, input_shape: tuple[int, ...], field: str) -> ExactGroup:
    flip = element_from_rearrangement(input_shape, lambda t: torch.flip(t, (spec.axis,)), "rev")
    return ExactGroup("reverse", [Element.identity(flip.size), flip], input_shape, spec=spec, generators=[1])


class _Request(BaseModel):
    """A model defined before the toy group is registered, holding a spec that holds a group spec."""

    spec: AuditSpec
    groups: list[GroupSpec] = []


@pytest.fixture
def reverse_group():
    from audit_service.engine.groups.build import GroupRecord, register_group, unregister_group

    record = register_group(GroupRecord(ReverseSpec, _build_reverse, True, "any input",
                                        {"name": "reverse", "axis": -1}, {"axis": "the axis read backwards"}))
    yield record
    unregister_group("reverse")


def test_a_group_registered_in_one_place_is_found_everywhere(reverse_group):
    """One ``register_group`` call: the spec parser, build_group, products and the catalogue all know it."""
    from audit_service.engine.spec import group_names, parse_audit_spec

    spec = parse_audit_spec({"group": {"name": "reverse", "axis": 0}})
    assert isinstance(spec.group, ReverseSpec) and spec.group.axis == 0
    assert "reverse" in group_names()
    group = build_group("reverse", (5,))
    assert group.order == 2 and torch.equal(group.orbit(torch.arange(5.0)[None])[1, 0], torch.arange(4.0, -1, -1))
    product = parse_audit_spec({"group": {"name": "product", "factors": ["reverse", "C4"]}}).group
    assert product.known_order() == 8 and build_group(product, (1, 4, 4)).order == 8
    held = _Request.model_validate({"spec": {"group": "reverse"}, "groups": [{"name": "reverse", "axis": 1}]})
    assert isinstance(held.spec.group, ReverseSpec) and held.groups[0].axis == 1  # models defined earlier too
    entry = next(e for e in group_catalogue() if e["name"] == "reverse")
    assert entry["description"].startswith("A toy group") and entry["parameters"]["axis"]["meaning"]
    with pytest.raises(SpecError) as info:
        parse_audit_spec({"group": {"name": "reverse", "axis": "x"}})
    assert info.value.field == "group.reverse.axis"


def test_an_unregistered_group_is_refused_again(reverse_group):
    from audit_service.engine.groups.build import unregister_group
    from audit_service.engine.spec import parse_audit_spec

    unregister_group("reverse")
    with pytest.raises(SpecError) as info:
        parse_audit_spec({"group": "reverse"})
    assert info.value.field == "group" and "expected one of C4" in info.value.message
    assert "reverse" not in [e["name"] for e in group_catalogue()]
