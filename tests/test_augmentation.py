"""Augmentation of image batches: seeded, moves images, keeps their range, validates its config."""

import pytest
import torch

from aet.config import ConfigError
from aet.training.augmentation import Augmentation, AugmentationConfig, build_augmentation
from aet.training.data import load_dataset

SHAKE = AugmentationConfig(augment_translate=0.15, augment_rotate=15.0, augment_scale=0.1)


@pytest.fixture(scope="module")
def batch():
    return torch.from_numpy(load_dataset("digits").train.x[:32])


def test_same_seed_same_transforms_and_the_input_is_untouched(batch):
    original = batch.clone()
    first, second = Augmentation(SHAKE, seed=3), Augmentation(SHAKE, seed=3)
    outputs = [first(batch) for _ in range(3)]
    assert all(torch.equal(a, second(batch)) for a in outputs)
    assert not torch.equal(outputs[0], outputs[1])  # each call draws a new transform
    assert torch.equal(batch, original)


def test_augmented_images_move_but_stay_images(batch):
    moved = Augmentation(SHAKE, seed=0)(batch)
    assert moved.shape == batch.shape and moved.dtype == batch.dtype
    assert 0.0 <= moved.min() and moved.max() <= 1.0 + 1e-6
    assert (moved - batch).abs().mean() > 0.02


def test_translation_alone_shifts_content():
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 4] = 1.0
    shifted = Augmentation(AugmentationConfig(augment_translate=0.3), seed=1)(image)
    assert shifted.sum() == pytest.approx(1.0, abs=0.05)  # bilinear spreads, keeps mass
    assert shifted[0, 0, 4, 4] < 0.9


def test_zero_config_is_no_augmentation_and_bad_values_are_named():
    assert build_augmentation(AugmentationConfig()) is None
    assert isinstance(build_augmentation(SHAKE, seed=1), Augmentation)
    with pytest.raises(
        ConfigError, match=r"augment_rotate: expected a number in \[0, 180\]; got -5"
    ):
        AugmentationConfig(augment_rotate=-5)
    with pytest.raises(ConfigError, match=r"augment_translate: expected a number in \[0, 0.5\]"):
        AugmentationConfig(augment_translate=float("nan"))
