"""The distillation set (stage 2 -> stage 3): (z, label, teacher image) triples on disk, memory-mapped.

A set is a run directory `<out>/distill/<NNNNN>-<desc>/` holding `z.npy` (float32, (N, nz)), `labels.npy` (int64,
(N,)), `images.npy` ((N, C, H, W), uint8 or float32), `meta.json` and a small `checkpoint.pt` (stage "distill")
with the teacher's privacy ledger unchanged: sampling the teacher is post-processing. create_dataset.py writes
the set into a hidden temporary directory and renames it into place only once it is complete.

uint8 images: u = round((x + 1) * 127.5), decoded as x = u / 127.5 - 1, so the error is at most 1/255 on [-1, 1].
"""
import json
import os

import numpy as np
import torch

from utils.run.checkpoint import load_checkpoint
from utils.run.cli import UserError

META_NAME = "meta.json"
IMAGE_ENCODINGS = {
    "uint8": {"encode": "u = round((x + 1) * 127.5)", "decode": "x = u / 127.5 - 1", "max_abs_error": 1 / 255},
    "float32": {"encode": "x", "decode": "x", "max_abs_error": 0.0},
}


ARRAYS = ("z", "labels", "images")


def array_specs(count: int, nz: int, image_shape, image_dtype: str) -> dict:
    """{name: {shape, dtype}} of the arrays of a set (recorded in meta.json); each is stored as `<name>.npy`."""
    return {"z": {"shape": [count, nz], "dtype": "float32"}, "labels": {"shape": [count], "dtype": "int64"},
            "images": {"shape": [count, *image_shape], "dtype": image_dtype}}


def nbytes(specs: dict) -> int:
    return sum(int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize for spec in specs.values())


def encode_images(images: torch.Tensor, dtype: str) -> np.ndarray:
    """Images in [-1, 1] as stored: uint8 with the rounding documented above, or float32 as they are."""
    if dtype == "uint8":
        return torch.round((images.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
    return images.float().numpy()


def decode_images(stored: np.ndarray) -> torch.Tensor:
    images = torch.from_numpy(np.ascontiguousarray(stored))
    return images.float() / 127.5 - 1.0 if images.dtype == torch.uint8 else images.float()


class DistillSet:
    """A loaded set: memory-mapped arrays `z`, `labels`, `images`; `batch(positions)` gives float tensors."""

    def __init__(self, run_dir: str, meta: dict, arrays: dict, ledger: dict):
        self.run_dir, self.meta, self.ledger = run_dir, meta, ledger
        self.z, self.labels, self.images = arrays["z"], arrays["labels"], arrays["images"]

    def __len__(self):
        return len(self.labels)

    @property
    def teacher_dir(self) -> str:
        return self.meta["teacher"]

    def batch(self, positions) -> tuple:
        """(z float32, labels int64, teacher images float32 in [-1, 1]) at `positions`."""
        positions = np.asarray(positions, dtype=np.int64)
        return (torch.from_numpy(np.ascontiguousarray(self.z[positions])),
                torch.from_numpy(np.ascontiguousarray(self.labels[positions])),
                decode_images(self.images[positions]))


def read_meta(run_dir: str) -> dict:
    path = os.path.join(run_dir, META_NAME)
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UserError(f"{run_dir}: no {META_NAME} (not a complete distillation set)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: corrupt ({exc})") from None


def _open_array(run_dir: str, name: str, shape, dtype) -> np.ndarray:
    path = os.path.join(run_dir, f"{name}.npy")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir}: {name}.npy is missing (not a complete distillation set)")
    try:
        array = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: corrupt or truncated ({exc})") from None
    if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise UserError(f"{path}: holds {array.dtype} {array.shape}, meta.json says {dtype} {tuple(shape)}")
    return array


def load_distill_set(path: str) -> DistillSet:
    """Open a distillation set (run directory, `latest` link or its checkpoint), checking every file."""
    checkpoint = load_checkpoint(path, "distill")
    run_dir = checkpoint["run_dir"]
    meta = read_meta(run_dir)
    try:
        files, count = meta["files"], meta["count"]
        arrays = {name: _open_array(run_dir, name, files[name]["shape"], files[name]["dtype"]) for name in ARRAYS}
    except (KeyError, TypeError) as exc:
        raise UserError(f"{run_dir}/{META_NAME}: no valid entry {exc}") from None
    lengths = {name: len(array) for name, array in arrays.items()}
    if set(lengths.values()) != {count} or checkpoint["step"] != count:
        raise UserError(f"{run_dir}: arrays of {lengths} samples, meta.json says {count}, "
                        f"checkpoint.pt {checkpoint['step']}")
    return DistillSet(run_dir, meta, arrays, checkpoint["privacy"])
