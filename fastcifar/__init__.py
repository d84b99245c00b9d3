"""fastcifar: ResNet-18 on CIFAR-10, done right and fast."""

__version__ = "0.1.0"


class FastCifarError(Exception):
    """An expected failure a user can act on: the CLI prints the message alone and exits 1."""
