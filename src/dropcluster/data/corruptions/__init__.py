"""The 19 common corruptions of Hendrycks & Dietterich (2019) as batched tensor operations.

"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations" (ICLR 2019)
builds CIFAR-10/100-C, Tiny-ImageNet-C and ImageNet-C with one script per family of data sets
(``make_cifar_c.py``, ``make_tinyimagenet_c.py``, ``make_imagenet_c.py`` in
hendrycks/robustness); each script has its own severity table. This package re-creates all 19
corruptions of those scripts on whole batches (N, C, H, W), on any device, with every random
number drawn from an explicit ``torch.Generator``:

* :mod:`~dropcluster.data.corruptions.noise_blur`: the paper's seven (gaussian, shot and
  impulse noise; defocus, glass, motion and zoom blur);
* :mod:`~dropcluster.data.corruptions.weather`: snow, frost, fog, spatter;
* :mod:`~dropcluster.data.corruptions.colour`: brightness, contrast, saturate, speckle_noise,
  gaussian_blur, pixelate;
* :mod:`~dropcluster.data.corruptions.elastic`: elastic_transform;
* :mod:`~dropcluster.data.corruptions.jpeg`: jpeg_compression.

Each module's docstring says what its tensor versions do and how close they come to the
reference (which used scipy, scikit-image, OpenCV, ImageMagick through Wand, and PIL).
:mod:`~dropcluster.data.corruptions.names` holds the names and the sets ``paper`` (7),
``benchmark`` (15), ``extra`` (4) and ``all`` (19).

Quantisation. Float images in give float images in [0, 1] out: the value the reference function
returns, divided by 255. uint8 images in give what the scripts store: CIFAR-C keeps
``np.uint8(x)`` and Tiny-ImageNet-C / ImageNet-C save ``Image.fromarray(np.uint8(x))``, and
``np.uint8`` of a float truncates, so uint8 outputs are ``floor(255 y + 1e-3)``. The 1e-3 (one
thousandth of a grey level) keeps a value that is an integer in exact arithmetic, such as a flat
region under a blur, from dropping a level through float32 round-off. Where the reference
gets its result back from an 8-bit image (motion blur from ImageMagick's PNG; the PIL
operations), it rounds, so the uint8 output is ``floor(255 y + 0.5)``. Tiny-ImageNet-C and
ImageNet-C were then saved as JPEG (quality 85); ``corrupt`` does not add those JPEG artefacts
(:func:`dropcluster.data.corrupted_sets.jpeg_round_trip` does).

Randomness. A batch is processed in chunks of ``max(1, 2**22 // (C H W))`` images (to bound
memory), chunk after chunk, each drawing its random numbers from ``generator`` in a fixed order;
the output therefore depends only on the inputs and the generator's state (not on threads), and
the same seed gives the same output. CPU and CUDA generators give different streams.
"""

from __future__ import annotations

from dropcluster.data.corruptions.apply import (
    CHUNK_ELEMENTS,
    SEVERITY_PARAMETERS,
    check_corruption,
    corrupt,
)
from dropcluster.data.corruptions.filters import (
    gaussian_kernel1d,
    motion_blur_at,
    motion_blur_kernel,
    motion_blur_offsets,
)
from dropcluster.data.corruptions.names import (
    BENCHMARK,
    CORRUPTION_SETS,
    CORRUPTIONS,
    EXTRA,
    FAMILIES,
    PAPER,
    corruption_names,
    family_for_size,
)
from dropcluster.data.corruptions.noise_blur import defocus_kernel, glass_shuffle, zoom_factors

__all__ = [
    "BENCHMARK",
    "CHUNK_ELEMENTS",
    "CORRUPTIONS",
    "CORRUPTION_SETS",
    "EXTRA",
    "FAMILIES",
    "PAPER",
    "SEVERITY_PARAMETERS",
    "check_corruption",
    "corrupt",
    "corruption_names",
    "defocus_kernel",
    "family_for_size",
    "gaussian_kernel1d",
    "glass_shuffle",
    "motion_blur_at",
    "motion_blur_kernel",
    "motion_blur_offsets",
    "zoom_factors",
]
