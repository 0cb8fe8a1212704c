"""Autoencoders for pretraining: MLP (optionally linear, tied or stacked), VAE and convolutional.

All models take rows `x` of shape (B, C, H, W), float32 images in [0, 1], or (B, D)
standardised vectors (every architecture but conv). `encode(x)` gives the
(B, code_size) embedding (for the VAE its mean mu), `decode(z)` the decoder's output in loss
space (logits for `bce`, pixel values for `mse` and the Gaussian mean for `gaussian`) and
`reconstruct(x)` pixels in [0, 1] units.
`objective(x_input, target, generator)` is the per-example training loss, summed over pixels
and averaged over the batch (for the VAE the negative ELBO).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from itertools import pairwise
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from aet.config import ConfigError

ARCHITECTURES = ("mlp", "linear", "stacked", "vae", "conv")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
}
LOSSES = ("bce", "mse", "gaussian")
LOG_VARIANCE_BOUND = 8.0  # `gaussian`: the predicted log-variances are clamped to +-8
TIEABLE = ("mlp", "linear", "stacked")  # architectures built from transposable Linear layers
FULLY_CONNECTED = (*TIEABLE, "vae")  # MLPAutoencoder and its VAE: every architecture but conv


@dataclass(frozen=True)
class ModelConfig:
    """What `build_autoencoder` needs (`aet pretrain`'s model flags); stored in every
    checkpoint, with its loss resolved, so a model can be rebuilt.

    The defaults are the shipped digits encoder.
    """

    architecture: str = field(
        default="stacked",
        metadata={
            "help": "mlp: end-to-end MLP; linear: MLP without activations; stacked: greedy "
            "layer-wise then fine-tune; vae: variational; conv: convolutional encoder",
            "choices": list(ARCHITECTURES),
        },
    )
    hidden_sizes: tuple[int, ...] = field(
        default=(256, 64),
        metadata={"help": "hidden layer sizes, input side first (channels for conv)"},
    )
    code_size: int = field(default=8, metadata={"help": "embedding dimension"})
    activation: str = field(
        default="relu",
        metadata={"help": "hidden activation (not used by linear)", "choices": list(ACTIVATIONS)},
    )
    tied_weights: bool | None = field(
        default=None,
        metadata={
            "help": "decoder reuses the transposed encoder weights; only mlp, linear and stacked "
            "can, and do unless --no-tied-weights"
        },
    )
    loss: str | None = field(
        default=None,
        metadata={
            "help": "bce: Bernoulli decoder, for images in [0, 1]; mse: Gaussian decoder of "
            "unit variance, for standardised vectors; gaussian: Gaussian decoder that also "
            "predicts each value's variance (mlp, linear, stacked and vae) "
            "(default: bce for images, mse for vectors)",
            "choices": list(LOSSES),
        },
    )
    allow_overcomplete: bool = field(
        default=False, metadata={"help": "permit a code at least as large as the input"}
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        _check_choice("architecture", self.architecture, ARCHITECTURES)
        if self.tied_weights is None:
            object.__setattr__(self, "tied_weights", self.architecture in TIEABLE)
        _check_choice("activation", self.activation, tuple(ACTIVATIONS))
        if self.loss is not None:
            _check_choice("loss", self.loss, LOSSES)
        if not self.hidden_sizes:
            raise ConfigError(
                "hidden_sizes: expected at least one hidden layer size; got an empty list"
            )
        if any(h < 1 for h in self.hidden_sizes):
            raise ConfigError(
                f"hidden_sizes: expected positive sizes; got {list(self.hidden_sizes)}"
            )
        if self.code_size < 1:
            raise ConfigError(f"code_size: expected a positive size; got {self.code_size}")
        if self.loss == "gaussian" and self.architecture not in FULLY_CONNECTED:
            raise ConfigError(
                "loss: gaussian (a decoder predicting variances) needs architecture "
                f"{', '.join(FULLY_CONNECTED)}; got {self.architecture}"
            )
        if self.tied_weights and self.architecture not in TIEABLE:
            raise ConfigError(
                f"tied_weights: supported by {', '.join(TIEABLE)}; "
                f"got architecture {self.architecture!r}"
            )

    @property
    def resolved_loss(self) -> str:
        """The loss of a built model (`build_autoencoder` and `for_data` resolve None)."""
        assert self.loss is not None, "an unresolved ModelConfig"
        return self.loss

    def for_data(self, standardized: bool) -> ModelConfig:
        """This model for images in [0, 1] (`standardized` False: Bernoulli model, BCE, by
        default) or standardised features (the Gaussian model, MSE, by default; BCE, which
        needs targets in [0, 1], and the conv architecture refused), its loss resolved."""
        loss = self.loss or ("mse" if standardized else "bce")
        if standardized and loss == "bce":
            raise ConfigError(
                "loss: bce (a Bernoulli decoder) needs data in [0, 1]; vectors are "
                "standardised features, use mse (the default for vectors)"
            )
        if standardized and self.architecture == "conv":
            raise ConfigError(
                "architecture: conv needs images (C, H, W); got a table of features: use "
                "mlp, linear, stacked or vae"
            )
        return dataclasses.replace(self, loss=loss)

    def check_input(self, image_shape: tuple[int, ...]) -> None:
        """Reject a code at least as large as the input unless overcomplete codes are allowed."""
        n_inputs = math.prod(image_shape)
        if self.code_size >= n_inputs and not self.allow_overcomplete:
            raise ConfigError(
                f"code_size: expected fewer than the {n_inputs} inputs of rows "
                f"{tuple(image_shape)} (pass --allow-overcomplete to permit it); "
                f"got {self.code_size}"
            )

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "hidden_sizes": list(self.hidden_sizes)}


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name}: unknown {name} {value!r}; valid: {', '.join(valid)}")


def reconstruction_loss(
    output: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    log_variance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example negative log-likelihood (up to a constant), summed over features.

    `bce` treats `output` as Bernoulli logits (BCE-with-logits is the numerically stable form
    of a sigmoid decoder); `mse` and `gaussian` as the mean of a Gaussian, of unit variance
    (half squared error) unless the decoder's `log_variance` (same shape) is given, as the
    `gaussian` loss's variance layer gives it. Returns shape (B,).
    """
    if kind == "bce":
        per_feature = F.binary_cross_entropy_with_logits(output, target, reduction="none")
    elif log_variance is None:
        per_feature = 0.5 * (output - target).square()
    else:
        per_feature = 0.5 * ((output - target).square() * torch.exp(-log_variance) + log_variance)
    return per_feature.flatten(1).sum(1)


def reconstruction_error(output: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row novelty score in the model's likelihood terms: the mean over input values of the
    binary cross-entropy (`bce`, `output` as logits) or of the squared error (`mse`).

    Returns shape (B,). Unlike `reconstruction_loss` it is a mean, so it reads the same for
    any input size, and the squared error is not halved.
    """
    if kind == "bce":
        # BCE with logits in its stable form, written out so the exported graph computes it
        # with the same operations as PyTorch (the exporter's own decomposition drifts ~1e-3);
        # log1p(exp(-|x|)), not softplus: onnxruntime's Softplus kernel costs 5x Exp + Log.
        per_feature = output.clamp(min=0) - output * target + torch.log1p(torch.exp(-output.abs()))
    else:
        per_feature = (output - target).square()
    return per_feature.flatten(1).mean(1)


class Autoencoder(nn.Module):
    """Base class: `encode`, `decode`, `reconstruct` and the training `objective`."""

    def __init__(self, config: ModelConfig, image_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.config = config
        self.image_shape = tuple(image_shape)
        self.n_inputs = math.prod(image_shape)

    @property
    def code_size(self) -> int:
        return self.config.code_size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder output in loss space for input `x`: (B, C, H, W)."""
        return self.decode(self.encode(x))

    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """Novelty score (B,) of clean inputs `x`: see `reconstruction_error` (VAE: from mu)."""
        return reconstruction_error(self(x), x, self.config.resolved_loss)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstructed pixels in [0, 1] units: (B, C, H, W)."""
        output = self(x)
        return torch.sigmoid(output) if self.config.resolved_loss == "bce" else output

    def negative_log_likelihood(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) the decoder's `reconstruction_loss` of `target` given codes `z`."""
        return reconstruction_loss(self.decode(z), target, self.config.resolved_loss)

    def objective(
        self, x_input: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Mean over the batch of the per-example loss of reconstructing `target` from `x_input`."""
        return self.negative_log_likelihood(self.encode(x_input), target).mean()


def _linear_layers(sizes: list[int]) -> nn.ModuleList:
    """Linear layers sizes[0] -> sizes[1] -> ... -> sizes[-1]."""
    return nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))


class TransposedLinear(nn.Module):
    """A decoder layer sharing (transposed) the weight of an encoder `nn.Linear`: tied weights."""

    encoder_layer: nn.Linear

    def __init__(self, encoder_layer: nn.Linear) -> None:
        super().__init__()
        # A plain attribute, not a submodule: the weight is owned (and saved) by the encoder.
        object.__setattr__(self, "encoder_layer", encoder_layer)
        self.bias = nn.Parameter(torch.zeros(encoder_layer.in_features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.encoder_layer.weight.t(), self.bias)


class MLPAutoencoder(Autoencoder):
    """Fully connected encoder input -> hidden_sizes -> code, decoder its mirror.

    Hidden layers use the activation (none for `linear`); the code and the decoder's output
    layer are linear. Layer k of the encoder (`encoder_layers[k]`) and its mirror
    `decoder_layers[k]` form the one-hidden-layer autoencoder trained in greedy stage k. With
    the `gaussian` loss a second linear output layer, `log_variance`, reads what the output
    layer reads and predicts each value's log-variance; only training uses it (`decode` is
    the mean, and the exported graph holds no variance).
    """

    def __init__(self, config: ModelConfig, image_shape: tuple[int, ...]) -> None:
        super().__init__(config, image_shape)
        sizes = [self.n_inputs, *config.hidden_sizes, config.code_size]
        self.encoder_layers = _linear_layers(sizes)
        # decoder_layers[k] maps layer k's output size back to its input size.
        if config.tied_weights:
            self.decoder_layers = nn.ModuleList(
                TransposedLinear(cast(nn.Linear, e)) for e in self.encoder_layers
            )
        else:
            self.decoder_layers = nn.ModuleList(nn.Linear(b, a) for a, b in pairwise(sizes))
        self.act = (
            nn.Identity() if config.architecture == "linear" else ACTIVATIONS[config.activation]()
        )
        self.log_variance = nn.Linear(sizes[1], sizes[0]) if config.loss == "gaussian" else None

    @property
    def n_layers(self) -> int:
        return len(self.encoder_layers)

    def encode_layer(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Encoder layer k (with its activation unless it makes the code)."""
        h = self.encoder_layers[k](h)
        return h if k == self.n_layers - 1 else self.act(h)

    def decode_layer(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Decoder mirror of layer k (with the activation unless it outputs pixels)."""
        h = self.decoder_layers[k](h)
        return h if k == 0 else self.act(h)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)  # (B, C*H*W)
        for k in range(self.n_layers):
            h = self.encode_layer(k, h)
        return h  # (B, code_size)

    def decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        """What the decoder's output layer reads for codes `z`: (B, size of layer 1)."""
        h = z
        for k in reversed(range(1, self.n_layers)):
            h = self.decode_layer(k, h)
        return h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_layer(0, self.decoder_input(z)).view(-1, *self.image_shape)

    def output_loss(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B,) `reconstruction_loss` of `target` from what the output layer reads, `h`."""
        log_variance = None
        if self.log_variance is not None:
            log_variance = self.log_variance(h).clamp(-LOG_VARIANCE_BOUND, LOG_VARIANCE_BOUND)
            log_variance = log_variance.view_as(target)
        output = self.decode_layer(0, h).view_as(target)
        return reconstruction_loss(output, target, self.config.resolved_loss, log_variance)

    def negative_log_likelihood(self, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.output_loss(self.decoder_input(z), target)

    def stage_input(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """The clean code layer k reads (the flattened pixels for k = 0): (B, size_k)."""
        h = x.flatten(1)
        for j in range(k):
            h = self.encode_layer(j, h)
        return h

    def stage_parameters(self, k: int) -> list[nn.Parameter]:
        """The parameters greedy stage k trains: encoder layer k and its decoder mirror (and
        for k = 0 the `gaussian` loss's variance layer)."""
        layers = [self.encoder_layers[k], self.decoder_layers[k]]
        if k == 0 and self.log_variance is not None:
            layers.append(self.log_variance)
        return [parameter for layer in layers for parameter in layer.parameters()]

    def stage_objective(
        self, k: int, h_input: torch.Tensor, h_target: torch.Tensor
    ) -> torch.Tensor:
        """Loss of the one-layer autoencoder k reconstructing `h_target` from `h_input`.

        Stage 0 reconstructs pixels with the model's loss (with the `gaussian` loss its
        variance layer trains with it); deeper stages reconstruct hidden codes, which are not
        probabilities, so they use squared error.
        """
        h = self.encode_layer(k, h_input)
        if k == 0:
            return self.output_loss(h, h_target).mean()
        return reconstruction_loss(self.decode_layer(k, h), h_target, "mse").mean()


class VariationalAutoencoder(MLPAutoencoder):
    """VAE (Kingma & Welling 2014, arXiv:1312.6114) on the MLP trunk; the embedding is mu.

    The last encoder layer outputs 2 * code_size numbers: the posterior mean and log-variance.
    """

    def __init__(self, config: ModelConfig, image_shape: tuple[int, ...]) -> None:
        super().__init__(dataclasses.replace(config, code_size=2 * config.code_size), image_shape)
        self.config = config
        last = cast(nn.Linear, self.encoder_layers[-1])
        self.decoder_layers[-1] = nn.Linear(config.code_size, last.in_features)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, log-variance) of q(z | x), each (B, code_size)."""
        mu, log_var = super().encode(x).chunk(2, dim=1)
        return mu, log_var

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def objective(
        self, x_input: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Negative ELBO: the NLL of a reparameterised sample + KL(q(z|x), N(0, I))."""
        mu, logvar = self.posterior(x_input)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        z = mu + eps * torch.exp(0.5 * logvar)
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(1)
        return (self.negative_log_likelihood(z, target) + kl).mean()


class ConvAutoencoder(Autoencoder):
    """Strided 3x3 convolutions (channels = hidden_sizes) -> linear code; transposed mirror."""

    def __init__(self, config: ModelConfig, image_shape: tuple[int, ...]) -> None:
        super().__init__(config, image_shape)
        channels, height, width = image_shape
        act = ACTIVATIONS[config.activation]
        encoder: list[nn.Module] = []
        sizes = [(height, width)]
        for c_in, c_out in pairwise((channels, *config.hidden_sizes)):
            encoder += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), act()]
            h, w = sizes[-1]
            sizes.append(((h + 1) // 2, (w + 1) // 2))
        self.feature_shape = (config.hidden_sizes[-1], *sizes[-1])
        n_features = math.prod(self.feature_shape)
        self.encoder = nn.Sequential(
            *encoder, nn.Flatten(), nn.Linear(n_features, config.code_size)
        )
        decoder: list[nn.Module] = [
            nn.Linear(config.code_size, n_features),
            act(),
            nn.Unflatten(1, self.feature_shape),
        ]
        outs = (*reversed(config.hidden_sizes[:-1]), channels)
        for i, (c_in, c_out) in enumerate(zip(reversed(config.hidden_sizes), outs, strict=True)):
            (h, w), (target_h, target_w) = sizes[-1 - i], sizes[-2 - i]
            # A stride-2 transposed conv gives 2n - 1 (+ output_padding) pixels: pad to the target.
            padding = (target_h - (2 * h - 1), target_w - (2 * w - 1))
            decoder.append(
                nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=padding)
            )
            if i < len(config.hidden_sizes) - 1:  # the last layer outputs loss-space pixels
                decoder.append(act())
        self.decoder = nn.Sequential(*decoder)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (B, code_size)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # (B, C, H, W)


def build_autoencoder(config: ModelConfig, image_shape: tuple[int, ...]) -> Autoencoder:
    """The autoencoder `config` describes for rows of `image_shape`: images (C, H, W), or
    vectors (D,) for every architecture but conv."""
    if config.loss is None:  # the rows' likelihood: Bernoulli for images, Gaussian for vectors
        config = dataclasses.replace(config, loss="mse" if len(image_shape) == 1 else "bce")
    config.check_input(tuple(image_shape))
    if config.architecture == "conv" and len(image_shape) != 3:
        raise ConfigError(
            f"architecture: conv needs images (C, H, W); got rows of shape "
            f"{tuple(image_shape)}: use mlp, linear, stacked or vae"
        )
    if config.architecture == "vae":
        return VariationalAutoencoder(config, image_shape)
    if config.architecture == "conv":
        return ConvAutoencoder(config, image_shape)
    return MLPAutoencoder(config, image_shape)
