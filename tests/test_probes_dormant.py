"""Dormant and active units on constructed activations with hand-computed answers."""

from __future__ import annotations

import pytest
import torch as th

from rl_plasticity.probes.dormant import active_fraction, dormant_fraction, mean_active_fraction, unit_scores

# Per-unit mean |H| over 4 samples; they sum to 8 over d = 8 units, so the layer mean is 1 and s_i = MEAN_ABS[i].
# Units 1-4 straddle the thresholds: 0.024 < 0.025 < 0.026 and 0.099 < 0.1 < 0.101.
MEAN_ABS = [0.0, 0.024, 0.026, 0.099, 0.101, 1.0, 2.0, 4.75]


def straddling_layer() -> th.Tensor:
    """(4, 8) activations with the per-unit mean |H| above, with signs and zeros mixed in."""
    columns = [
        [0.0, 0.0, 0.0, 0.0],
        [0.096, 0.0, 0.0, 0.0],
        [0.0, -0.052, 0.052, 0.0],
        [0.099, -0.099, 0.099, -0.099],
        [0.202, 0.0, 0.0, -0.202],
        [2.0, 0.0, 2.0, 0.0],
        [1.0, 3.0, -2.0, 2.0],
        [4.75, 4.75, 4.75, 4.75],
    ]
    return th.tensor(columns, dtype=th.float64).T


def test_unit_scores_hand_computed():
    H = straddling_layer()
    assert unit_scores(H).tolist() == pytest.approx(MEAN_ABS, rel=1e-12)
    # Scores are relative to the layer mean: scaling the layer leaves them unchanged.
    assert unit_scores(10 * H).tolist() == pytest.approx(MEAN_ABS, rel=1e-12)
    assert unit_scores(H).mean().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("tau", "expected"),
    [(0.0, 1 / 8), (0.025, 2 / 8), (0.1, 4 / 8), (1.0, 6 / 8), (100.0, 1.0)],
)
def test_dormant_fraction_thresholds(tau, expected):
    # tau = 0: only the all-zero unit; 0.025: also 0.024; 0.1: also 0.026 and 0.099; 1.0: also 0.101 and 1.0.
    assert dormant_fraction(straddling_layer(), tau) == pytest.approx(expected)


def test_default_tau_is_sokar():
    assert dormant_fraction(straddling_layer()) == pytest.approx(2 / 8)


def test_score_equal_to_tau_is_dormant():
    # Dyadic values, so the scores are exact: 0.5, 0.5, 1, 2 (layer mean 1).
    H = th.tensor([[1.0, 0.0, 2.0, 4.0], [0.0, 1.0, 0.0, 0.0]])
    assert unit_scores(H).tolist() == [0.5, 0.5, 1.0, 2.0]
    assert dormant_fraction(H, tau=0.5) == 0.5
    assert dormant_fraction(H, tau=0.4999) == 0.0


def test_tau_zero_counts_only_exactly_zero_units():
    H = th.tensor([[0.0, 1e-30, 5.0], [0.0, 0.0, 5.0]])
    assert dormant_fraction(H, tau=0.0) == pytest.approx(1 / 3)


def test_all_zero_layer_is_dormant():
    H = th.zeros(6, 5)
    assert unit_scores(H).tolist() == [0.0] * 5
    for tau in (0.0, 0.025, 0.1):
        assert dormant_fraction(H, tau) == 1.0
    assert active_fraction(H) == 0.0
    assert mean_active_fraction(H) == 0.0


def test_active_and_mean_active_differ():
    # Unit 0 fires on one sample of four, unit 1 on all, unit 2 never.
    H = th.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 5.0, 0.0]])
    assert active_fraction(H) == pytest.approx(2 / 3)
    # Per sample: 2/3, 1/3, 1/3, 1/3, so the mean is 5/12.
    assert mean_active_fraction(H) == pytest.approx(5 / 12)


def test_conv_activations_one_unit_per_channel():
    # (n=2, C=3, 2, 2): channel 0 all zero; channel 1 is 0.16 at one of 8 positions (mean |H| 0.02);
    # channel 2 is +-2.98 everywhere. Layer mean (0 + 0.02 + 2.98) / 3 = 1, so the scores are 0, 0.02, 2.98.
    H = th.zeros(2, 3, 2, 2, dtype=th.float64)
    H[0, 1, 1, 0] = 0.16
    H[:, 2] = 2.98
    H[1, 2, 0, 1] = -2.98
    assert unit_scores(H).tolist() == pytest.approx([0.0, 0.02, 2.98], rel=1e-12)
    assert dormant_fraction(H, tau=0.0) == pytest.approx(1 / 3)
    assert dormant_fraction(H, tau=0.025) == pytest.approx(2 / 3)
    assert active_fraction(H) == pytest.approx(2 / 3)
    # Sample 0 has channels 1 and 2 non-zero somewhere, sample 1 only channel 2.
    assert mean_active_fraction(H) == pytest.approx(1 / 2)
    # Same scores as treating every (sample, position) as a row of a dense layer.
    dense = H.permute(0, 2, 3, 1).reshape(-1, 3)
    assert th.allclose(unit_scores(H), unit_scores(dense))


def test_return_types_and_input_untouched():
    H = straddling_layer().float()
    original = H.clone()
    for probe in (dormant_fraction, active_fraction, mean_active_fraction):
        assert type(probe(H)) is float
    assert unit_scores(H).dtype == th.float64
    assert th.equal(H, original)


@pytest.mark.parametrize(
    "bad",
    [
        th.ones(5),
        th.ones(2, 3, 4),
        th.ones(0, 3),
        th.ones(2, 0),
        th.ones(0, 3, 2, 2),
        th.ones(2, 3, 0, 2),
        th.tensor([[1.0, float("nan")]]),
        th.tensor([[float("inf"), 1.0]]),
        [[1.0, 2.0]],
    ],
)
def test_bad_input_raises(bad):
    for probe in (unit_scores, dormant_fraction, active_fraction, mean_active_fraction):
        with pytest.raises(ValueError):
            probe(bad)


def test_negative_tau_raises():
    with pytest.raises(ValueError, match="tau"):
        dormant_fraction(th.ones(2, 2), tau=-0.01)
