"""Metric functions against hand-computed values, and the streaming accumulator against them."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from audit_service.engine import metrics
from audit_service.engine.metrics import ConditionAccumulator, summarize
from audit_service.engine.metrics import functional as F
from audit_service.engine.metrics.saliency import postprocess
from audit_service.engine.metrics.sensitivity import finite_difference_jacobian_sketch, jacobian, singular_values


def test_the_package_re_exports_every_metric_function():
    """``engine.metrics`` is the public face of the pure functions: each public function of ``functional`` is
    there, the same object, and in ``__all__`` (a new metric function not exported fails here)."""
    public = sorted(name for name, value in vars(F).items()
                    if inspect.isfunction(value) and value.__module__ == F.__name__ and not name.startswith("_"))
    assert "logit_invariance_error" in public and len(public) >= 9
    assert [name for name in public if getattr(metrics, name, None) is not getattr(F, name)] == []
    assert [name for name in public if name not in metrics.__all__] == []


def test_logit_invariance_error_by_hand():
    fx = torch.tensor([[1.0, 2.0]])
    fgx = torch.tensor([[[1.0, 2.0]], [[2.0, 0.0]]])  # identity, then a moved copy
    li = F.logit_invariance_error(fx, fgx)
    # 1/2 (1^2 + 2^2) = 2.5 for the second element, 0 for the identity
    assert li.tolist() == [[0.0], [2.5]]


def test_distribution_invariance_error_by_hand():
    fx = torch.tensor([[0.0, 0.0]])                      # p = (1/2, 1/2)
    fgx = torch.tensor([[[0.0, 0.0]], [[math.log(3.0), 0.0]]])  # q = (3/4, 1/4)
    di = F.distribution_invariance_error(fx, fgx)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert di[0, 0].item() == 0.0
    assert di[1, 0].item() == pytest.approx(expected, rel=1e-6)


def test_constant_logit_shift_leaves_di_zero_but_not_li():
    fx = torch.randn(5, 4)
    fgx = torch.stack([fx, fx + 3.0])
    assert F.distribution_invariance_error(fx, fgx).abs().max().item() < 1e-6
    assert F.logit_invariance_error(fx, fgx)[1].tolist() == pytest.approx([0.5 * 4 * 9.0] * 5)


def test_agreement_and_accuracy():
    fx = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    fgx = torch.stack([fx, torch.tensor([[0.0, 1.0], [0.0, 1.0]])])
    assert F.prediction_agreement(fx, fgx).tolist() == [[1.0, 1.0], [0.0, 1.0]]
    assert F.orbit_accuracy(fgx, torch.tensor([0, 1])).tolist() == [[1.0, 1.0], [0.0, 1.0]]


def test_saliency_similarity_cosine_and_zero_maps():
    m_x = torch.tensor([[1.0, 0.0], [0.0, 0.0]])          # second probe: zero map
    aligned = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]]])
    si = F.saliency_similarity(m_x, aligned)
    assert si[0, 0].item() == pytest.approx(1.0)
    assert si[1, 0].item() == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(si[0, 1].item()) and math.isnan(si[1, 1].item())


def test_sample_variation_is_mean_pairwise_squared_distance():
    logits = torch.randn(7, 3, dtype=torch.float64)
    pairwise = ((logits[:, None] - logits[None]) ** 2).sum(-1).mean()
    assert F.sample_variation(logits).item() == pytest.approx(pairwise.item(), rel=1e-10)


def test_accumulator_matches_batch_functions_over_chunks():
    torch.manual_seed(0)
    fgx = torch.randn(4, 10, 5)
    labels = torch.randint(0, 5, (10,))
    si = torch.rand(4, 10)
    acc = ConditionAccumulator(num_classes=5)
    for s in (slice(0, 3), slice(3, 10)):
        acc.update(fgx[:, s], labels[s], si[:, s])
    assert acc.values("LI").mean() == pytest.approx(F.logit_invariance_error(fgx[0], fgx).mean().item(), rel=1e-6)
    assert acc.values("DI").mean() == pytest.approx(F.distribution_invariance_error(fgx[0], fgx).mean().item(),
                                                    rel=1e-5)
    assert acc.values("SI").mean() == pytest.approx(si.mean().item(), rel=1e-6)
    assert acc.sample_variation == pytest.approx(F.sample_variation(fgx[0]).item(), rel=1e-6)
    assert acc.n == 10


def test_summarize_percentiles_and_interval():
    values = np.arange(101, dtype=float)
    s = summarize(values, n_bootstrap=500, seed=1)
    assert s["mean"] == 50 and s["p5"] == 5 and s["p50"] == 50 and s["p95"] == 95
    assert s["ci95"][0] < 50 < s["ci95"][1]
    assert summarize(np.array([np.nan])) is None


def test_postprocess_thresholds_at_ninety_percent_then_blurs():
    attr = torch.zeros(1, 1, 7, 7)
    attr[0, 0, 3, 3] = -1.0      # |.| = 1: the peak
    attr[0, 0, 0, 0] = 0.95      # kept (>= 0.9 * peak)
    attr[0, 0, 6, 6] = 0.5       # dropped
    m = postprocess(attr, sample_rank=3)
    assert m[0, 0, 6, 6].item() == 0.0 and m[0, 0, 5, 5].item() == 0.0
    # Gaussian k=3 sigma=1 spreads the peak: the centre keeps its normalised centre weight
    w = torch.exp(torch.tensor([-1.0, 0.0, -1.0]) / 2)
    w = w / w.sum()
    assert m[0, 0, 3, 3].item() == pytest.approx((w[1] ** 2).item(), rel=1e-5)
    assert m[0, 0, 2, 3].item() == pytest.approx((w[0] * w[1]).item(), rel=1e-5)
    assert postprocess(torch.zeros(2, 1, 5, 5), 3).abs().sum().item() == 0.0


def test_jacobian_of_linear_model_has_its_singular_values():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3, bias=True))
    x = torch.randn(4, 1, 3, 4)
    jac = jacobian(lin, x)
    assert jac.shape == (4, 3, 12)
    assert torch.allclose(jac[2], lin[1].weight.detach(), atol=1e-6)
    expected = torch.linalg.svdvals(lin[1].weight.detach().double())
    assert torch.allclose(singular_values(jac)[0], expected, atol=1e-6)
    # the gradient-free sketch with all directions recovers the same spectrum
    with torch.no_grad():
        sketch = finite_difference_jacobian_sketch(lin, x, n_directions=12)
    assert torch.allclose(singular_values(sketch)[0], expected, rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- properties
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra.numpy import arrays  # noqa: E402

_logits = arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(2, 6)),
                 elements=st.floats(-30, 30, width=32))


@settings(max_examples=60, deadline=None)
@given(_logits)
def test_metric_laws_on_random_orbits(fgx_np):
    """DI, LI >= 0; both 0 and agreement 1 on the identity; DI blind to a constant logit shift."""
    fgx = torch.from_numpy(fgx_np)
    fx = fgx[0]
    assert (F.distribution_invariance_error(fx, fgx) >= 0).all()
    assert (F.logit_invariance_error(fx, fgx) >= 0).all()
    assert F.logit_invariance_error(fx, fgx)[0].abs().max().item() == 0.0
    assert F.distribution_invariance_error(fx, fgx)[0].abs().max().item() < 1e-6
    assert F.prediction_agreement(fx, fgx)[0].min().item() == 1.0
    shifted = torch.cat([fx[None], fgx[1:] + 5.0]) if fgx.shape[0] > 1 else fgx
    assert torch.allclose(F.distribution_invariance_error(fx, shifted), F.distribution_invariance_error(fx, fgx),
                          atol=1e-4)


def test_chance_agreement_and_kappa():
    from audit_service.engine.metrics import chance_agreement, chance_corrected

    uniform = torch.tensor([5.0, 5.0, 5.0, 5.0])
    assert chance_agreement(uniform, uniform) == pytest.approx(0.25)
    one = torch.tensor([0.0, 7.0, 0.0])
    assert chance_agreement(one, one * 3) == pytest.approx(1.0)
    assert chance_agreement(torch.tensor([9.0, 1.0]), torch.tensor([9.0, 1.0])) == pytest.approx(0.82)
    assert chance_corrected(1.0, 1.0) is None           # one class: agreement cannot beat chance
    assert chance_corrected(0.25, 0.25) == pytest.approx(0.0)
    assert chance_corrected(1.0, 0.25) == pytest.approx(1.0)
    assert chance_corrected(None, 0.5) is None
    with pytest.raises(ValueError, match="Expected two class-count vectors"):
        chance_agreement(uniform, torch.ones(3))


def test_accumulator_counts_predictions_and_labels():
    from audit_service.engine.metrics import ConditionAccumulator

    acc = ConditionAccumulator(num_classes=3)
    logits_x = torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])
    logits_gx = torch.stack([logits_x, torch.tensor([[5.0, 0, 0], [5.0, 0, 0]])])
    acc.update(logits_gx, labels=torch.tensor([0, 0]))
    s = acc.prediction_summary()
    assert s["classes_predicted"] == 2 and s["majority_class"] == 0 and s["majority_fraction"] == pytest.approx(0.75)
    # at x: (1/2, 1/2, 0); on the orbit: (3/4, 1/4, 0) -> 3/8 + 1/8
    assert s["agreement_chance"] == pytest.approx(0.5)
    assert s["accuracy_chance"] == pytest.approx(1.0)
