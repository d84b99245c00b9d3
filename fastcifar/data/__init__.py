"""Data: CIFAR files -> validated uint8 arrays -> device-resident loaders. Knows nothing of training."""
