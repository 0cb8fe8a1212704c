"""Statistics, purity and validation of the denoising corruptions."""

from __future__ import annotations

import math

import pytest
import torch

from aet.config import ConfigError
from aet.training.corruption import (
    CORRUPTION_KINDS,
    Corruption,
    build_corruption,
    gaussian,
    masking,
    salt_and_pepper,
)

torch.set_num_threads(1)

# 50,176 entries: a corrupted fraction's standard error is <= 0.0023, so +-0.012 is > 5 sigma.
TOLERANCE = 0.012


@pytest.fixture
def batch() -> torch.Tensor:
    """Pixels strictly inside (0.1, 0.9), so any 0 or 1 afterwards was put there by corruption."""
    return 0.1 + 0.8 * torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_masking_zeroes_a_fraction_and_keeps_the_rest(batch, fraction):
    out = masking(batch, fraction, seeded())
    masked = out == 0
    assert masked.float().mean().item() == pytest.approx(fraction, abs=TOLERANCE)
    assert torch.equal(out[~masked], batch[~masked])


@pytest.mark.parametrize("fraction, low, high", [(0.2, 0.0, 1.0), (0.6, -1.0, 2.0)])
def test_salt_and_pepper_sets_only_min_or_max_half_each(batch, fraction, low, high):
    out = salt_and_pepper(batch, fraction, seeded(), low=low, high=high)
    changed = out != batch
    assert set(out[changed].unique().tolist()) == {low, high}
    assert changed.float().mean().item() == pytest.approx(fraction, abs=TOLERANCE)
    assert (out == low).float().mean().item() == pytest.approx(fraction / 2, abs=TOLERANCE)
    assert (out == high).float().mean().item() == pytest.approx(fraction / 2, abs=TOLERANCE)


@pytest.mark.parametrize("sigma", [0.05, 0.3])
def test_gaussian_noise_has_standard_deviation_sigma(batch, sigma):
    noise = gaussian(batch, sigma, seeded()) - batch
    assert noise.std().item() == pytest.approx(sigma, rel=0.02)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01 * sigma + 1e-6)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda x, g: gaussian(x, 0.5, g),
        lambda x, g: masking(x, 0.5, g),
        lambda x, g: salt_and_pepper(x, 0.5, g),
    ],
    ids=["gaussian", "masking", "salt-and-pepper"],
)
def test_input_untouched_output_same_shape_and_dtype(batch, corrupt):
    for x in (batch, batch.double()):
        before = x.clone()
        out = corrupt(x, seeded())
        assert torch.equal(x, before)
        assert out.shape == x.shape and out.dtype == x.dtype and not torch.equal(out, x)


def test_level_zero_is_the_identity(batch):
    assert torch.equal(gaussian(batch, 0.0, seeded()), batch)
    assert torch.equal(masking(batch, 0.0, seeded()), batch)
    assert torch.equal(salt_and_pepper(batch, 0.0, seeded()), batch)


@pytest.mark.parametrize(
    "kind, level", [("gaussian", 0.2), ("masking", 0.3), ("salt-and-pepper", 0.3)]
)
def test_same_seed_same_noise_and_resume_from_generator_state(batch, kind, level):
    first, again, other = (build_corruption(kind, level, seed=s) for s in (7, 7, 8))
    step_one = first(batch)
    assert torch.equal(step_one, again(batch))
    assert not torch.equal(step_one, other(batch))
    state = first.generator.get_state()
    step_two = first(batch)
    assert not torch.equal(step_two, step_one)  # each training step draws fresh noise
    resumed = build_corruption(kind, level, seed=0)
    resumed.generator.set_state(state)
    assert torch.equal(resumed(batch), step_two)


def test_build_corruption_none_is_no_corruption():
    assert build_corruption(None, 0.5) is None
    assert build_corruption("none", 0.0) is None
    corrupt = build_corruption("masking", 0.25)
    assert isinstance(corrupt, Corruption) and (corrupt.kind, corrupt.level) == ("masking", 0.25)
    assert CORRUPTION_KINDS == ("none", "gaussian", "masking", "salt-and-pepper")


@pytest.mark.parametrize(
    "kind, level, message",
    [
        ("masking", 1.0, r"masking needs a fraction nu in \[0, 1\); got 1.0"),
        ("masking", -0.1, r"masking needs a fraction nu in \[0, 1\); got -0.1"),
        ("salt-and-pepper", 1.5, r"salt-and-pepper needs a fraction nu in \[0, 1\); got 1.5"),
        ("salt-and-pepper", math.nan, r"got nan"),
        ("gaussian", -0.01, r"gaussian needs a finite sigma >= 0; got -0.01"),
        ("gaussian", math.inf, r"got inf"),
    ],
)
def test_invalid_levels_are_rejected_before_training(batch, kind, level, message):
    with pytest.raises(ConfigError, match=message):
        build_corruption(kind, level)
    function = {"gaussian": gaussian, "masking": masking, "salt-and-pepper": salt_and_pepper}[kind]
    with pytest.raises(ConfigError, match=message):
        function(batch, level, seeded())


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(
        ConfigError,
        match="unknown corruption 'dropout'; valid corruptions: "
        "none, gaussian, masking, salt-and-pepper",
    ):
        build_corruption("dropout", 0.1)
    with pytest.raises(ConfigError, match="valid corruptions: gaussian, masking, salt-and-pepper"):
        Corruption("none", 0.0)
