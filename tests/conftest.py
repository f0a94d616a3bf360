"""Shared fixtures: a tiny Fashion-MNIST-shaped IDX dataset on disk and tiny pipeline runs built on it."""
import gzip
import os
import struct
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)

TINY_TRAIN, TINY_TEST = 600, 200
TINY_PUBLIC = 200
TINY_G = ["16", "8", "4"]
TINY_D = ["8", "8"]


def write_idx(path, array: np.ndarray, compress: bool):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path + (".gz" if compress else ""), "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A class-dependent bar pattern plus noise, so that classes are learnable and distinguishable."""
    images = rng.integers(0, 40, size=(len(labels), 28, 28))
    for i, label in enumerate(labels):
        images[i, 2 * label + 2: 2 * label + 7, 4:24] = 220
    return images


def write_tiny_dataset(root: str, compress: bool = True):
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for prefix, count in (("train", TINY_TRAIN), ("t10k", TINY_TEST)):
        labels = np.arange(count) % 10
        rng.shuffle(labels)
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte"), make_images(labels, rng), compress)
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte"), labels, compress)
    return root


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("tiny-fashion")))


def tiny_data_args(data_root):
    return ["--data-root", data_root, "--public-size", str(TINY_PUBLIC)]


def teacher_argv(data_root, out, *extra):
    return ["--out", out, *tiny_data_args(data_root), "--g-channels", *TINY_G, "--d-channels", *TINY_D,
            "--batch-size", "16", "--epochs", "1", "--max-steps", "3", "--device", "cpu", *extra]


@pytest.fixture(scope="session")
def tiny_teacher_run(tiny_data_root, tmp_path_factory):
    """(out root, run dir) of a 3-step tiny teacher trained on the public split."""
    import train_teacher
    out = str(tmp_path_factory.mktemp("pipeline"))
    run_dir = train_teacher.main(train_teacher.parse_args(teacher_argv(tiny_data_root, out)))
    return out, run_dir
