"""Autoencoder architectures: shapes, tied weights, linearity, the VAE objective, config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from aet.config import ConfigError
from aet.training.models import (
    ARCHITECTURES,
    LOG_VARIANCE_BOUND,
    TIEABLE,
    ModelConfig,
    TransposedLinear,
    build_autoencoder,
    reconstruction_loss,
)

torch.set_num_threads(1)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("image_shape", [(1, 8, 8), (3, 13, 11)])
def test_every_architecture_encodes_to_code_size_and_reconstructs_the_image_shape(
    architecture, image_shape
):
    torch.manual_seed(0)
    config = ModelConfig(
        architecture=architecture,
        hidden_sizes=(16, 8),
        code_size=4,
        tied_weights=architecture in TIEABLE,
    )
    model = build_autoencoder(config, image_shape).eval()
    x = torch.rand(5, *image_shape)
    assert model.encode(x).shape == (5, 4)
    pixels = model.reconstruct(x)
    assert pixels.shape == (5, *image_shape)
    assert torch.all((pixels >= 0) & (pixels <= 1))  # bce: sigmoid of logits
    loss = model.objective(x, x, torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_tied_decoder_uses_the_transposed_encoder_weights_and_owns_only_biases():
    tied = build_autoencoder(
        ModelConfig(architecture="mlp", hidden_sizes=(16,), code_size=4, tied_weights=True),
        (1, 8, 8),
    )
    untied = build_autoencoder(
        ModelConfig(architecture="mlp", hidden_sizes=(16,), code_size=4, tied_weights=False),
        (1, 8, 8),
    )
    for encoder_layer, decoder_layer in zip(tied.encoder_layers, tied.decoder_layers, strict=True):
        assert isinstance(decoder_layer, TransposedLinear)
        assert decoder_layer.encoder_layer is encoder_layer
    n_weights = 64 * 16 + 16 * 4
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(untied) - count(tied) == n_weights
    assert not any("decoder_layers.0.encoder_layer" in key for key in tied.state_dict())
    h = torch.rand(3, 16)
    expected = F.linear(h, tied.encoder_layers[0].weight.t(), tied.decoder_layers[0].bias)
    torch.testing.assert_close(tied.decoder_layers[0](h), expected)


def test_linear_autoencoder_encoder_is_affine():
    torch.manual_seed(0)
    model = build_autoencoder(
        ModelConfig(architecture="linear", hidden_sizes=(32, 16), code_size=4), (1, 8, 8)
    )
    a, b, zero = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    offset = model.encode(zero)
    torch.testing.assert_close(
        model.encode(a + b) - offset, (model.encode(a) - offset) + (model.encode(b) - offset)
    )


def test_vae_embedding_is_the_deterministic_mean_and_its_objective_samples_from_the_generator():
    torch.manual_seed(0)
    model = build_autoencoder(
        ModelConfig(architecture="vae", hidden_sizes=(32,), code_size=4), (1, 8, 8)
    )
    x = torch.rand(6, 1, 8, 8)
    mu, logvar = model.posterior(x)
    torch.testing.assert_close(model.encode(x), mu)
    torch.testing.assert_close(model.encode(x), model.encode(x))
    same = [model.objective(x, x, torch.Generator().manual_seed(1)) for _ in range(2)]
    other = model.objective(x, x, torch.Generator().manual_seed(2))
    assert same[0].item() == same[1].item() != other.item()
    # The negative ELBO is at least the KL term alone (the reconstruction NLL is >= 0 for bce).
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1).mean()
    assert same[0].item() > kl.item() >= 0


def test_reconstruction_losses_match_their_likelihoods():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    target = torch.tensor([[1.0, 0.0, 0.5]])
    p = torch.sigmoid(logits)
    bce = -(target * p.log() + (1 - target) * (1 - p).log()).sum(1)
    torch.testing.assert_close(reconstruction_loss(logits, target, "bce"), bce)
    torch.testing.assert_close(
        reconstruction_loss(logits, target, "mse"), torch.tensor([0.5 * (1 + 4 + 2.25)])
    )
    log_variance = torch.tensor([[0.0, math.log(4.0), -1.0]])
    gaussian = 0.5 * (1 / 1 + math.log(1) + 4 / 4 + math.log(4) + 2.25 * math.e - 1.0)
    torch.testing.assert_close(
        reconstruction_loss(logits, target, "gaussian", log_variance), torch.tensor([gaussian])
    )
    torch.testing.assert_close(  # unit variances: the mse loss
        reconstruction_loss(logits, target, "gaussian", torch.zeros(1, 3)),
        reconstruction_loss(logits, target, "mse"),
    )


@pytest.mark.parametrize("architecture", ["mlp", "stacked"])
def test_a_gaussian_decoder_learns_each_features_variance_and_decodes_its_mean(architecture):
    """Two standardised features share one signal, which a 1-d code holds; around it feature 0
    has little noise and feature 1 much: trained by the gaussian loss, the variance layer
    tells them apart, while `decode` (what is exported) stays the mean alone."""
    torch.manual_seed(0)
    config = ModelConfig(
        architecture=architecture,
        hidden_sizes=(16,),
        code_size=1,
        activation="elu",
        loss="gaussian",
    )
    model = build_autoencoder(config, (2,))
    if architecture == "stacked":  # greedy stage 0 trains the variance layer too
        stage = {id(p) for p in model.stage_parameters(0)}
        assert {id(p) for p in model.log_variance.parameters()} <= stage
        assert not stage & {id(p) for p in model.stage_parameters(1)}
    x = torch.randn(512, 1) + torch.randn(512, 2) * torch.tensor([0.05, 1.0])
    x = (x - x.mean(0)) / x.std(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(1000):
        optimiser.zero_grad()
        model.objective(x, x).backward()
        optimiser.step()
    with torch.no_grad():
        z = model.encode(x)
        mean, log_variance = model.decode(z), model.log_variance(model.decoder_input(z))
        bounded = log_variance.clamp(-LOG_VARIANCE_BOUND, LOG_VARIANCE_BOUND)
        by_hand = reconstruction_loss(mean, x, "gaussian", bounded).mean()
        torch.testing.assert_close(model.objective(x, x), by_hand)
    assert mean.shape == (512, 2)
    residual = (mean - x).square().mean(0).log()
    assert residual[1] - residual[0] > math.log(100)  # the code holds feature 0's signal
    assert log_variance.mean(0)[1] - log_variance.mean(0)[0] > math.log(100)


def test_a_gaussian_vae_decodes_its_mean_and_samples_its_objective():
    model = build_autoencoder(
        ModelConfig(architecture="vae", hidden_sizes=(16,), code_size=2, loss="gaussian"), (5,)
    )
    x = torch.randn(4, 5)
    assert model.decode(model.encode(x)).shape == (4, 5)
    assert model.log_variance.out_features == 5
    first = model.objective(x, x, torch.Generator().manual_seed(1))
    assert torch.isfinite(first)
    assert first != model.objective(x, x, torch.Generator().manual_seed(2))


def test_conv_decoder_restores_odd_image_sizes():
    model = build_autoencoder(
        ModelConfig(architecture="conv", hidden_sizes=(4, 8, 8), code_size=3, tied_weights=False),
        (1, 28, 27),
    )
    assert model.feature_shape == (8, 4, 4)
    assert model.decode(torch.zeros(2, 3)).shape == (2, 1, 28, 27)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"architecture": "rbm"}, "valid: mlp, linear, stacked, vae, conv"),
        ({"activation": "swish"}, "valid: relu, tanh, sigmoid, gelu, elu"),
        ({"loss": "l1"}, "valid: bce, mse, gaussian"),
        (
            {"architecture": "conv", "loss": "gaussian", "tied_weights": False},
            "loss: gaussian .* needs architecture mlp, linear, stacked, vae; got conv",
        ),
        (
            {"hidden_sizes": ()},
            "hidden_sizes: expected at least one hidden layer size; got an empty",
        ),
        ({"hidden_sizes": (16, 0)}, "expected positive sizes; got [16, 0]"),
        ({"code_size": 0}, "code_size: expected a positive size; got 0"),
        (
            {"architecture": "vae", "tied_weights": True},
            "tied_weights: supported by mlp, linear, stacked",
        ),
    ],
)
def test_invalid_model_configs_name_the_field_and_the_valid_values(changes, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        ModelConfig(**changes)


def test_overcomplete_code_needs_explicit_permission():
    with pytest.raises(
        ConfigError, match=r"code_size: expected fewer than the 64 inputs .* got 64"
    ):
        build_autoencoder(ModelConfig(code_size=64), (1, 8, 8))
    model = build_autoencoder(ModelConfig(code_size=64, allow_overcomplete=True), (1, 8, 8))
    assert model.encode(torch.rand(2, 1, 8, 8)).shape == (2, 64)
