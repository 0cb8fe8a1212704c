"""`training.standardize.FeatureStandardizer`: statistics, round trips, the torch module."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aet.training.export import StandardizeModule
from aet.training.standardize import FeatureStandardizer, StandardizerError


def test_fit_transform_gives_zero_mean_unit_std_and_constant_features_map_to_zero():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, size=(200, 4)).astype(np.float64)
    x[:, 2] = 7.0  # constant: std 0 must not give NaN
    standardizer = FeatureStandardizer.fit(x)
    z = standardizer.transform(x)
    assert z.dtype == np.float32 and z.shape == (200, 4)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z[:, [0, 1, 3]].std(axis=0), 1.0, atol=1e-4)
    assert (z[:, 2] == 0).all()
    np.testing.assert_allclose(standardizer.inverse_transform(z), x, rtol=1e-5, atol=1e-4)


def test_dict_round_trip_through_json_keeps_the_statistics():
    x = np.random.default_rng(1).normal(size=(50, 1, 2, 3))
    standardizer = FeatureStandardizer.fit(x)
    again = FeatureStandardizer.from_dict(json.loads(json.dumps(standardizer.to_dict())))
    assert again.feature_shape == (1, 2, 3)
    np.testing.assert_array_equal(again.mean, standardizer.mean)
    np.testing.assert_array_equal(again.std, standardizer.std)


def test_module_matches_numpy_transform():
    x = np.random.default_rng(2).uniform(-4, 9, size=(30, 6)).astype(np.float32)
    standardizer = FeatureStandardizer.fit(x)
    with torch.no_grad():
        got = StandardizeModule(standardizer)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, standardizer.transform(x), rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_field():
    standardizer = FeatureStandardizer.fit(np.ones((3, 2)))
    with pytest.raises(StandardizerError, match=r"x: expected shape \(N, 2\); got \(3, 5\)"):
        standardizer.transform(np.ones((3, 5)))
    with pytest.raises(StandardizerError, match="finite"):
        FeatureStandardizer.fit(np.array([[1.0], [np.nan]]))
    with pytest.raises(StandardizerError, match="model.json: expected fields"):
        FeatureStandardizer.from_dict(
            {"kind": "standardize", "shape": [3], "mean": [1.0], "std": [1.0]}, "model.json"
        )
