"""Weight, update and gradient statistics on a tiny nn.Linear with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch as th
from torch import nn

from rl_plasticity.probes.weights import grad_stats, snapshot, update_stats, weight_stats


def tiny_linear() -> nn.Linear:
    """Linear(2, 2) with weight [[3, -4], [0, 0]] (norm 5, |w| sum 7) and bias [0, 12] (norm 12, |b| sum 12)."""
    layer = nn.Linear(2, 2)
    with th.no_grad():
        layer.weight.copy_(th.tensor([[3.0, -4.0], [0.0, 0.0]]))
        layer.bias.copy_(th.tensor([0.0, 12.0]))
    return layer


def backward_with_known_grads(layer: nn.Linear) -> None:
    """loss = <weight, A> + <bias, b>, so weight.grad = A = [[6, 8], [0, 0]] (norm 10), bias.grad = b = [0, 24] (24)."""
    loss = (layer.weight * th.tensor([[6.0, 8.0], [0.0, 0.0]])).sum() + (layer.bias * th.tensor([0.0, 24.0])).sum()
    loss.backward()


def test_weight_stats_hand_values():
    stats = weight_stats(tiny_linear())
    assert stats["weight"] == pytest.approx({"l2_norm": 5.0, "mean_abs": 7 / 4})
    assert stats["bias"] == pytest.approx({"l2_norm": 12.0, "mean_abs": 6.0})
    # Root-sum-of-squares, not 5 + 12; the mean |w| over all six entries.
    assert stats["total"] == pytest.approx({"l2_norm": 13.0, "mean_abs": 19 / 6})
    assert set(stats) == {"weight", "bias", "total"}


def test_dist_from_init_hand_values():
    layer = tiny_linear()
    init = snapshot(layer)
    assert weight_stats(layer, init)["total"]["dist_from_init"] == 0.0
    with th.no_grad():
        layer.weight += th.tensor([[0.0, 0.0], [3.0, 4.0]])  # distance 5
        layer.bias.zero_()  # distance 12
    stats = weight_stats(layer, init)
    assert stats["weight"]["dist_from_init"] == pytest.approx(5.0)
    assert stats["bias"]["dist_from_init"] == pytest.approx(12.0)
    assert stats["total"]["dist_from_init"] == pytest.approx(13.0)
    # The weight norm itself is now sqrt(9 + 16 + 9 + 16).
    assert stats["weight"]["l2_norm"] == pytest.approx(math.sqrt(50.0))


def test_snapshot_is_a_detached_copy():
    layer = tiny_linear()
    snap = snapshot(layer)
    assert set(snap) == {"weight", "bias"}
    assert not snap["weight"].requires_grad
    with th.no_grad():
        layer.weight.zero_()
    assert snap["weight"].tolist() == [[3.0, -4.0], [0.0, 0.0]]


def test_update_stats_after_a_gradient_step():
    layer = tiny_linear()
    before = snapshot(layer)
    backward_with_known_grads(layer)
    with th.no_grad():  # a plain SGD step, lr 0.5 (th.optim's first step is slow to import)
        for p in layer.parameters():
            p -= 0.5 * p.grad
    # The update is -0.5 * grad: norms 5 and 12, total 13.
    assert update_stats(before, snapshot(layer)) == pytest.approx({"weight": 5.0, "bias": 12.0, "total": 13.0})


def test_grad_stats_and_clip_coef():
    layer = tiny_linear()
    backward_with_known_grads(layer)
    assert grad_stats(layer) == pytest.approx({"weight": 10.0, "bias": 24.0, "total": 26.0})
    # Clipping scaled the gradients by 0.5: the pre-clip norms are twice the stored ones.
    with th.no_grad():
        for p in layer.parameters():
            p.grad *= 0.5
    assert grad_stats(layer, clip_coef=0.5) == pytest.approx({"weight": 10.0, "bias": 24.0, "total": 26.0})


def test_grad_stats_recovers_clip_grad_norm():
    layer = tiny_linear()
    backward_with_known_grads(layer)
    max_norm = 13.0
    pre_clip = th.nn.utils.clip_grad_norm_(layer.parameters(), max_norm).item()
    clip_coef = min(1.0, max_norm / (pre_clip + 1e-6))  # what clip_grad_norm_ multiplied by
    assert grad_stats(layer)["total"] == pytest.approx(13.0, rel=1e-6)
    assert grad_stats(layer, clip_coef)["total"] == pytest.approx(pre_clip) == pytest.approx(26.0)


def test_parameters_without_grad_are_left_out():
    model = nn.Sequential(tiny_linear(), nn.Linear(2, 1))
    loss = (model[0].weight * th.tensor([[6.0, 8.0], [0.0, 0.0]])).sum() + 0.0 * model[0].bias.sum()
    loss.backward()
    stats = grad_stats(model)
    assert set(stats) == {"0.weight", "0.bias", "total"}  # 0.bias got a zero gradient, layer 1 none
    assert stats == pytest.approx({"0.weight": 10.0, "0.bias": 0.0, "total": 10.0})
    assert grad_stats(nn.Linear(2, 2)) == {"total": 0.0}


def test_nested_names_and_untouched_model():
    model = nn.Sequential(tiny_linear(), nn.ReLU(), tiny_linear())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = weight_stats(model, snapshot(model))
    assert set(stats) == {"0.weight", "0.bias", "2.weight", "2.bias", "total"}
    assert stats["total"]["l2_norm"] == pytest.approx(math.sqrt(2 * 169.0))
    assert all(type(v) is float for entry in stats.values() for v in entry.values())
    assert all(th.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_inputs_raise():
    layer = tiny_linear()
    init = snapshot(layer)
    with pytest.raises(ValueError, match="bias"):
        weight_stats(layer, {"weight": init["weight"]})
    with pytest.raises(ValueError, match="shape"):
        weight_stats(layer, {"weight": th.zeros(3, 2), "bias": init["bias"]})
    with pytest.raises(ValueError):
        update_stats(init, {"weight": init["weight"]})
    with pytest.raises(ValueError):
        update_stats(init, {"weight": init["weight"], "bias": th.tensor([float("nan"), 0.0])})
    for coef in (0.0, -1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="clip_coef"):
            grad_stats(layer, coef)
    with th.no_grad():
        layer.weight[0, 0] = float("inf")
    with pytest.raises(ValueError):
        weight_stats(layer)
