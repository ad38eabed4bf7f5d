"""Datasets as whole tensors, plus batched on-device augmentation.

The training loop keeps a whole split as one float32 tensor on the training device and augments a batch
at a time on that device: no per-sample transforms, no DataLoader workers. Pixels stay in [0, 1];
per-channel normalization with `DatasetInfo.mean`/`.std` is the first layer inside the model, so attacks
and their eps live in pixel space.

    >>> train = load_split({"name": "imagefolder", "root": "data/pets"}, "train").to("cuda")
    >>> test = load_split({"name": "imagefolder", "root": "data/pets"}, "test", like=train.info)
    >>> g = torch.Generator("cuda").manual_seed(0)
    >>> for idx in batches(len(train), 128, shuffle=True, generator=g):
    ...     xb, yb = augment(train.x[idx], generator=g), train.y[idx]

Modules, one idea each:
  - `base`: DataError, DatasetInfo, TensorData, DataSpec (a recipe's data section), pixel statistics;
  - `builtin`: CIFAR-10/100, SVHN, Fashion-MNIST (torchvision's files, md5-checked) and digits;
  - `imagefolder`: your own images, a folder per class, decoded once into a uint8 cache;
  - `arrays`: .npz files read without pickle, and the `npz` kind (x_train, y_train, x_test, y_test);
  - `extra`: RST's pseudo-labeled extra data (`data.extra`);
  - `batching`: index batches (plain and RST-mixed) and the batched crop + flip;
  - `registry`: `REGISTRY` of every `data.name` (built-in sets and the imagefolder / npz kinds) and
    `load_split`, the one entry point.
"""
from .arrays import images_to_tensor, load_npz, read_npz
from .base import DEFAULT_ROOT, DataError, DatasetInfo, DataSpec, TensorData, channel_stats
from .batching import augment, batches, cutout, mixed_batch_sizes, mixed_batches
from .builtin import DATASETS
from .extra import load_extra
from .imagefolder import cache_dir, load_imagefolder
from .registry import REGISTRY, Source, dataset_info, info_from_checkpoint, load_dataset, load_split

__all__ = [
    "DATASETS", "DEFAULT_ROOT", "REGISTRY", "DataError", "DataSpec", "DatasetInfo", "Source", "TensorData", "augment",
    "batches", "cache_dir", "channel_stats", "cutout", "dataset_info", "images_to_tensor", "info_from_checkpoint", "load_dataset",
    "load_extra", "load_imagefolder", "load_npz", "load_split", "mixed_batch_sizes", "mixed_batches", "read_npz",
]
