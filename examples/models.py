"""Flax Linen models of the examples: 1-D CNNs, a digits CNN and a ResNet-18."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class CNN1D(nn.Module):
    """Three convolution + max-pool stages and a two-layer head, for MNIST-1D.

    Attributes:
      num_classes: Number of output logits.
      channels: Channels of the three convolutions.
      hidden: Width of the hidden dense layer.
      batch_norm: Whether each convolution is followed by BatchNorm.
    """

    num_classes: int = 10
    channels: Sequence[int] = (32, 64, 128)
    hidden: int = 256
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        for width in self.channels:
            x = nn.Conv(width, kernel_size=(5,), padding="SAME")(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
            x = nn.max_pool(x, window_shape=(2,), strides=(2,), padding="SAME")
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class DigitsCNN(nn.Module):
    """Two convolutions and a linear classifier for 8x8 digit images."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        del train
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a projection shortcut when needed."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
        shortcut = x
        y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = norm()(y)
        if shortcut.shape != y.shape:
            shortcut = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False)(
                x
            )
            shortcut = norm()(shortcut)
        return nn.relu(y + shortcut)


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images: a 3x3 stem and four stages of two blocks."""

    num_classes: int = 10
    widths: Sequence[int] = (64, 128, 256, 512)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        x = nn.Conv(self.widths[0], (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for stage, width in enumerate(self.widths):
            for block in range(2):
                strides = 2 if stage > 0 and block == 0 else 1
                x = ResidualBlock(width, strides)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


MODELS = ("cnn1d", "cnn1d_bn", "digits_cnn", "resnet18")
DEFAULT_MODEL = {
    "mnist1d": "cnn1d",
    "digits": "digits_cnn",
    "cifar10": "resnet18",
    "cifar100": "resnet18",
}


def build_model(name: str, num_classes: int) -> nn.Module:
    """Returns the model called ``name`` with ``num_classes`` outputs.

    Raises:
      ValueError: If ``name`` is not one of :data:`MODELS`.
    """
    if name == "cnn1d":
        return CNN1D(num_classes)
    if name == "cnn1d_bn":
        return CNN1D(num_classes, batch_norm=True)
    if name == "digits_cnn":
        return DigitsCNN(num_classes)
    if name == "resnet18":
        return ResNet18(num_classes)
    raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}.")
