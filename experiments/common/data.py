r"""Image data for the VAE and DDPM experiments, all offline.

* ``"digits"``: scikit-learn's shipped 8x8 digits (1797 images), the stand-in for MNIST here,
  split into train and test with a fixed seed, stratified by class.
* ``"mnist"``: real MNIST from files the user supplies: an ``.npz`` with ``x_train``,
  ``y_train``, ``x_test``, ``y_test`` (as Keras ships it), or a folder of the four IDX files
  (``train-images-idx3-ubyte`` etc., optionally ``.gz``). Nothing is downloaded.

Images come as float tensors ``(N, 1, H, W)`` with values in [0, 1], labels as ``(N,)`` longs.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Images", "load_images", "load_digits", "load_mnist", "read_idx"]

_IDX_DTYPES: dict[int, type | str] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclass
class Images:
    r"""A train/test split: images ``(N, 1, H, W)`` in [0, 1] and labels ``(N,)``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def size(self) -> int:
        return self.x_train.shape[-1]


def read_idx(path: str | Path) -> np.ndarray:
    r"""Reads one IDX file (optionally gzipped), the format MNIST is distributed in.

    Raises:
        ValueError: The file is not a valid IDX file (bad magic number or wrong length).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an IDX file: bad magic number {raw[:4].hex()}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    start, count = 4 + 4 * ndim, int(np.prod(dims)) if dims else 0
    if len(raw) != start + count * dtype.itemsize:
        raise ValueError(
            f"{str(path)!r} is truncated or too long: header says {dims} ({count} values), "
            f"file holds {(len(raw) - start) // dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=start).reshape(dims)


def _as_images(x: np.ndarray, y: np.ndarray, where: str) -> tuple[Tensor, Tensor]:
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"{where}: expected images (N, H, W) and labels (N,), got {x.shape} and {y.shape}"
        )
    scale = 255.0 if x.dtype == np.uint8 or x.max() > 1 else 1.0
    images = torch.from_numpy(np.asarray(x, dtype=np.float32) / scale)[:, None]
    return images, torch.from_numpy(np.asarray(y, dtype=np.int64))


def load_mnist(path: str | Path) -> Images:
    r"""Loads MNIST from a user-supplied ``.npz`` file or folder of IDX files.

    Raises:
        FileNotFoundError: The path, or one of the four IDX files, does not exist.
        ValueError: A file is malformed, or the npz lacks a key.
    """
    path = Path(path)
    if path.is_file():
        with np.load(path) as npz:
            missing = [k for k in _IDX_FILES if k not in npz]
            if missing:
                raise ValueError(
                    f"{str(path)!r} lacks the keys {missing}; it has {sorted(npz.files)}"
                )
            arrays = {k: npz[k] for k in _IDX_FILES}
    elif path.is_dir():
        arrays = {}
        for key, name in _IDX_FILES.items():
            found = [p for p in (path / name, path / f"{name}.gz") if p.is_file()]
            if not found:
                raise FileNotFoundError(f"MNIST folder {str(path)!r} lacks {name} (or {name}.gz)")
            arrays[key] = read_idx(found[0])
    else:
        raise FileNotFoundError(
            f"MNIST path {str(path)!r} is neither an .npz file nor a folder of IDX files"
        )
    x_train, y_train = _as_images(arrays["x_train"], arrays["y_train"], f"{path} (train)")
    x_test, y_test = _as_images(arrays["x_test"], arrays["y_test"], f"{path} (test)")
    return Images(x_train, y_train, x_test, y_test)


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> Images:
    r"""scikit-learn's 8x8 digits (values 0..16 scaled to [0, 1]), split stratified by class."""
    from sklearn.datasets import load_digits as _sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = _sklearn_digits()
    x = digits.images.astype(np.float32) / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    return Images(
        torch.from_numpy(x_tr)[:, None],
        torch.from_numpy(y_tr).long(),
        torch.from_numpy(x_te)[:, None],
        torch.from_numpy(y_te).long(),
    )


def load_images(
    dataset: str,
    *,
    data_path: str = "",
    test_fraction: float = 0.25,
    max_train: int = 0,
    seed: int = 0,
) -> Images:
    r"""The images a VAE or DDPM task config names; ``max_train > 0`` keeps that many training
    images (the first ones; for quick runs)."""
    images = (
        load_digits(test_fraction=test_fraction, seed=seed)
        if dataset == "digits"
        else load_mnist(data_path)
    )
    if max_train:
        images.x_train, images.y_train = images.x_train[:max_train], images.y_train[:max_train]
    return images
