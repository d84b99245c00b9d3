"""fastcifar: ResNet-18 on CIFAR-10, done right and fast."""

__version__ = "0.2.0"


class FastCifarError(Exception):
    """An expected failure a user can act on: the CLI prints the message alone and exits with `exit_code`."""

    exit_code = 1


class TrainingDiverged(FastCifarError):
    """A NaN/Inf loss or gradient: the run stops, the last good checkpoint stays."""
