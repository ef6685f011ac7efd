"""Data: the paper's data sets as uint8 tensors, subsets, batched augmentation, a device loader.

``fashion_mnist`` reads Fashion-MNIST's IDX files; ``datasets`` loads every data set by name;
``downloads`` fetches (resumably) Fashion-MNIST's files, and CIFAR-10, CIFAR-100 and Tiny
ImageNet and their released corrupted sets (CIFAR-10-C, CIFAR-100-C, Tiny-ImageNet-C), which it
extracts; ``corrupted_sets`` reads those;
``corruptions`` makes the 19 corruptions as tensor operations;
``subsets`` draws class-balanced fractions; ``augment`` augments whole batches on the device;
``loader`` iterates over a data set held on the device, with exact resume.
"""

from dropcluster.data.augment import (
    AUGMENT_PRESETS,
    CIFAR10_AUGMENT,
    CIFAR_AUGMENT,
    FASHION_MNIST_AUGMENT,
    SYNTHETIC_AUGMENT,
    TINY_IMAGENET_AUGMENT,
    AugmentConfig,
    augment_batch,
    channel_mean_std,
    normalize,
)
from dropcluster.data.datasets import DATASET_NAMES, ImageDataset, load_dataset, make_synthetic
from dropcluster.data.downloads import (
    download_cifar10,
    download_cifar10_c,
    download_cifar100,
    download_cifar100_c,
    download_fashion_mnist,
    download_tiny_imagenet,
    download_tiny_imagenet_c,
)
from dropcluster.data.loader import DeviceLoader
from dropcluster.data.subsets import stratified_subset

__all__ = [
    "AUGMENT_PRESETS",
    "CIFAR10_AUGMENT",
    "CIFAR_AUGMENT",
    "DATASET_NAMES",
    "FASHION_MNIST_AUGMENT",
    "SYNTHETIC_AUGMENT",
    "TINY_IMAGENET_AUGMENT",
    "AugmentConfig",
    "DeviceLoader",
    "ImageDataset",
    "augment_batch",
    "channel_mean_std",
    "download_cifar10",
    "download_cifar100",
    "download_cifar100_c",
    "download_cifar10_c",
    "download_fashion_mnist",
    "download_tiny_imagenet",
    "download_tiny_imagenet_c",
    "load_dataset",
    "make_synthetic",
    "normalize",
    "stratified_subset",
]
