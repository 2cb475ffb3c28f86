"""Dataset settings shared by several experiment configs (one place per dataset)."""

import ml_collections


def cifar10(config: ml_collections.ConfigDict) -> None:
  """CIFAR-10 train split from a prepared TFDS copy, 32x32x3, with random flips."""
  config.data.source = "tfds"
  config.data.name = "cifar10"
  config.data.random_flip = True


def fashion_mnist(config: ml_collections.ConfigDict) -> None:
  """Fashion-MNIST from a prepared TFDS copy, padded from 28 to 32, with random flips."""
  config.data.source = "tfds"
  config.data.name = "fashion_mnist"
  config.data.random_flip = True
