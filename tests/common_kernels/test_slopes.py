import math

import pytest
import torch

from common_kernels import alibi_slopes, decay_rates, layer_decay_factor, preset_config


def test_power_of_two_slopes():
    assert alibi_slopes(16) == [2 ** (-0.5 * (h + 1)) for h in range(16)]
    assert alibi_slopes(32)[0] == pytest.approx(0.8409, abs=1e-4) and alibi_slopes(32)[-1] == 2**-8


def test_non_power_of_two_slopes_interleave_the_doubled_schedule():
    assert alibi_slopes(6) == alibi_slopes(4) + alibi_slopes(8)[0::2][:2]
    assert alibi_slopes(12) == alibi_slopes(8) + [2 ** (-0.5 * (2 * i + 1)) for i in range(4)]


@pytest.mark.parametrize(
    "convention,layer,factor",
    [
        ("engine", 0, 1.00001),
        ("engine", 18, 1 - 18 / 19 + 1e-5),
        ("hf", 0, 1 + 1 / 19 + 1e-5),
        ("hf", 18, 1 - 17 / 19 + 1e-5),
    ],
)
def test_layer_factor_conventions(convention, layer, factor):
    assert layer_decay_factor(layer, 20, convention) == pytest.approx(factor, rel=1e-15)


def test_conventions_shift_by_one_layer_and_double_the_deepest_linear_slope():
    assert layer_decay_factor(18, 20, "hf") == pytest.approx(layer_decay_factor(17, 20, "engine"))
    assert layer_decay_factor(18, 20, "hf") / layer_decay_factor(18, 20, "engine") == pytest.approx(2.0, rel=1e-3)


def test_ring_mini_decays_match_the_spec():
    mini = preset_config("ring-mini-linear-2.0")
    lam0 = torch.exp(-decay_rates(mini, 0, torch.float64))
    lam18 = torch.exp(-decay_rates(mini, 18, torch.float64))
    assert lam0[0].item() == pytest.approx(0.4931, abs=1e-4) and lam0[-1].item() == pytest.approx(0.9961, abs=1e-4)
    assert lam18[0].item() == pytest.approx(0.9635, abs=1e-4) and lam18[-1].item() == pytest.approx(0.99979, abs=1e-5)
    hf = preset_config("ring-mini-linear-2.0", linear_decay_convention="hf")
    assert decay_rates(hf, 18, torch.float64)[0].item() == pytest.approx(2**-0.5 * (1 - 17 / 19 + 1e-5))


def test_single_layer_model_has_finite_decay_and_bad_arguments_fail():
    assert math.isfinite(layer_decay_factor(0, 1, "hf"))
    with pytest.raises(ValueError, match="convention"):
        layer_decay_factor(0, 20, "mlx")
    with pytest.raises(ValueError, match="outside"):
        layer_decay_factor(20, 20)
    with pytest.raises(ValueError, match="positive"):
        alibi_slopes(0)
