"""A released synthetic dataset on disk: its two formats, writing them, and reading any such set back in order
(docs/DESIGN.md, "Releasing a synthetic dataset").

Formats (`FORMATS`), both of 8-bit images, the generator's [-1, 1] output rounded (`to_uint8`):
  png   an ImageFolder tree: one folder per class, named `<label>-<class name>` (`class_folder_names`: sorted, as
        torchvision's `ImageFolder` sorts them, the folders give back the generator's labels), holding
        `<index>.png`, index i being sample i of the seeded draw;
  npz   one `dataset.npz`: `images` uint8 (N, H, W, C), `labels` int64 (N,), `class_names` (C,) strings.

`read_set` reads generate.py's sets and any ImageFolder tree or .npz: the images in index order where every file
name is a distinct integer (generate.py's), else in a seeded order (a class-sorted folder would put one class in
the protocol's hold-out), refusing images of another size or channel count than the data's, or classes other than
the data's. Writing imports no torch (generate.py's ONNX path runs without it); reading uses the decoding of
utils/data/folders.py. Bad input raises `UserError` (one line, exit 2). A set is built in a hidden directory and
numbered once complete (`publish`), as utils/run/checkpoint.py numbers every stage's runs.
"""
import os
import re
import shutil
import tempfile

import numpy as np
from PIL import Image

from utils.run.checkpoint import mark_latest, new_run_dir
from utils.run.cli import UserError, progress_bar

FORMATS = ("png", "npz")
NPZ_NAME = "dataset.npz"
INDEX_NAME = re.compile(r"^(\d+)$")
NUMBERED = re.compile(r"(\d{5})-")


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] as 8-bit values, rounded as torchvision's `save_image` rounds (half up);
    `utils.data.datasets.to_unit_range` maps them back."""
    return np.clip(np.floor((np.asarray(images, np.float32) + 1.0) * 127.5 + 0.5), 0, 255).astype(np.uint8)


def class_folder_names(class_names) -> list:
    """`<label>-<name>` (label zero-padded, path separators replaced): sorted, they are in label order."""
    width = len(str(len(class_names) - 1))
    return [f"{label:0{width}d}-{name.replace(os.sep, '_').replace('/', '_')}"
            for label, name in enumerate(class_names)]


def count_per_class(labels: np.ndarray, class_names) -> dict:
    return {name: int((labels == label).sum()) for label, name in enumerate(class_names)}


# ---------------------------------------------------------------- writing

def index_width(count: int) -> int:
    return max(6, len(str(count - 1)))


def write_png_tree(root: str, images: np.ndarray, labels: np.ndarray, class_names) -> list:
    """`root/<label>-<name>/<index>.png` for uint8 images (N, C, H, W); returns the class folder names."""
    folders = class_folder_names(class_names)
    for name in folders:
        os.makedirs(os.path.join(root, name))
    width = index_width(len(labels))
    for index in progress_bar(range(len(labels)), desc="write png", leave=False):
        image = images[index]
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(pixels).save(os.path.join(root, folders[labels[index]], f"{index:0{width}d}.png"))
    return folders


def write_npz(root: str, images: np.ndarray, labels: np.ndarray, class_names) -> str:
    """`root/dataset.npz` for uint8 images (N, C, H, W): images stored (N, H, W, C)."""
    path = os.path.join(root, NPZ_NAME)
    np.savez_compressed(path, images=images.transpose(0, 2, 3, 1), labels=labels.astype(np.int64),
                        class_names=np.asarray(class_names, dtype=str))
    return path


def staging_dir(stage_dir: str) -> str:
    """A hidden `.partial-*` directory in `stage_dir` to build a set in (never numbered: never taken for one)."""
    os.makedirs(stage_dir, exist_ok=True)
    path = tempfile.mkdtemp(prefix=".partial-", dir=stage_dir)
    os.chmod(path, 0o755)  # mkdtemp makes it private; a released set is not
    return path


def numbered_dirs(stage_dir: str) -> list:
    """The numbered sets `<stage_dir>/<NNNNN>-<desc>`, newest first."""
    if not os.path.isdir(stage_dir):
        return []
    return [os.path.join(stage_dir, name) for name in sorted(os.listdir(stage_dir), reverse=True)
            if NUMBERED.match(name) and os.path.isdir(os.path.join(stage_dir, name))]


def publish(staging: str, out: str, stage: str, desc: str) -> str:
    """Move a complete set to `<out>/<stage>/<NNNNN>-<desc>` (`new_run_dir`: numbered one past the highest; a
    rename onto that freshly reserved, empty directory) and point `<out>/<stage>/latest` at it."""
    target = new_run_dir(out, stage, desc)
    os.replace(staging, target)
    mark_latest(target)
    return target


def discard(staging: str):
    shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- reading

class ReleasedSet:
    """A set read back: uint8 images (N, C, H, W), int64 labels, its class names, and how it was ordered."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names, order: str, source: str):
        self.images, self.labels, self.class_names = images, labels, tuple(class_names)
        self.order, self.source = order, source

    def __len__(self):
        return len(self.labels)


def located(path: str) -> tuple:
    """("npz", its file) for an .npz file or a folder holding dataset.npz, else ("folder", path)."""
    npz = path if os.path.isfile(path) else os.path.join(path, NPZ_NAME)
    if os.path.isfile(npz):
        return "npz", npz
    if not os.path.isdir(path):
        raise UserError(f"--synthetic {path}: no such folder or .npz file")
    return "folder", path


def count_images(path: str) -> int:
    """How many images the set at `path` holds, from its labels or its file names (nothing decoded)."""
    from utils.data.folders import images_under  # imports torch, as `read_png_tree`
    kind, where = located(path)
    if kind == "folder":
        return sum(len(images_under(folder)) for folder in subfolders(where))
    try:
        with np.load(where, allow_pickle=False) as data:
            return len(data["labels"])
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{where}: not an .npz with 'images' (N, H, W, C) uint8 and 'labels' ({exc})") from exc


def read_set(path: str, image_shape: tuple, class_names, seed: int = 0) -> ReleasedSet:
    """The set at `path` (a folder of class folders, a folder holding dataset.npz, or an .npz file), checked
    against the data's (channels, height, width) `image_shape` and `class_names`."""
    kind, where = located(path)
    if kind == "npz":
        return read_npz(where, tuple(image_shape), tuple(class_names))
    return read_png_tree(where, tuple(image_shape), tuple(class_names), seed)


def read_npz(path: str, image_shape: tuple, class_names: tuple) -> ReleasedSet:
    try:
        with np.load(path, allow_pickle=False) as data:
            images, labels = data["images"], data["labels"]
            names = tuple(str(n) for n in data["class_names"]) if "class_names" in data else class_names
    except (OSError, ValueError, KeyError) as exc:  # KeyError: no images or labels in it
        raise UserError(f"{path}: not an .npz with 'images' (N, H, W, C) uint8 and 'labels' ({exc})") from exc
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (len(images),):
        raise UserError(f"{path}: 'images' must be uint8 (N, H, W, C) and 'labels' (N,), found {images.dtype} "
                        f"{images.shape} and {labels.shape}")
    found = (images.shape[3], images.shape[1], images.shape[2])
    if found != image_shape:
        raise UserError(f"{path}: its images are {shape_text(found)}, the data's {shape_text(image_shape)}")
    if names != class_names:
        raise UserError(f"{path}: its classes {list(names)} are not the data's {list(class_names)}")
    if len(labels) and not (0 <= labels.min() and labels.max() < len(class_names)):
        raise UserError(f"{path}: labels outside 0..{len(class_names) - 1}")
    return ReleasedSet(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels.astype(np.int64), class_names,
                       "file order", path)


def shape_text(shape: tuple) -> str:
    channels, height, width = shape
    return f"{height}x{width} with {channels} channel{'s' if channels != 1 else ''}"


def subfolders(root: str) -> list:
    """The visible sub-folders of `root`, sorted (as ImageFolder lists its classes)."""
    return sorted(e.path for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def class_folders(root: str, class_names: tuple) -> list:
    """The class folders of `root`, in label order: `class_folder_names(class_names)`, or the class names
    themselves where they are already sorted (a user's folder dataset: ImageFolder sorts them the same way)."""
    found = [os.path.basename(folder) for folder in subfolders(root)]
    accepted = [class_folder_names(class_names)]
    if sorted(class_names) == list(class_names):
        accepted.append(list(class_names))
    if found not in accepted:
        raise UserError(f"{root}: its class folders {found} do not match the data's classes (expected "
                        f"{accepted[0]})")
    return found


def read_png_tree(root: str, image_shape: tuple, class_names: tuple, seed: int) -> ReleasedSet:
    # folders.py imports torch: reading is never on generate.py's torch-free path
    from utils.data.folders import GREY_MODES, header, images_under, open_image
    files, labels = [], []
    for label, folder in enumerate(class_folders(root, class_names)):
        found = images_under(os.path.join(root, folder))
        if not found:
            raise UserError(f"class folder {os.path.join(root, folder)} has no images (PNG, JPEG or BMP)")
        files += found
        labels += [label] * len(found)
    for path in files:  # every header first (no decoding): a refusal comes before any progress output
        mode, (width, height) = header(path)
        found = (1 if mode in GREY_MODES else 3, height, width)
        if found != image_shape:
            raise UserError(f"{path}: the image is {shape_text(found)}, the data's are {shape_text(image_shape)}")
    images = np.empty((len(files), *image_shape), np.uint8)
    for i, path in enumerate(progress_bar(files, desc="read images", leave=False)):
        pixels = np.asarray(open_image(path).convert("L" if image_shape[0] == 1 else "RGB"), np.uint8)
        images[i] = pixels[None] if image_shape[0] == 1 else pixels.transpose(2, 0, 1)
    order, how = file_order(files, seed)
    return ReleasedSet(images[order], np.asarray(labels, np.int64)[order], class_names, how, root)


def file_order(files: list, seed: int) -> tuple:
    """(positions, how): by the index in the file names where each is a distinct integer (generate.py's sets),
    else a permutation seeded by `seed`."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in files]
    if all(INDEX_NAME.match(stem) for stem in stems) and len(set(map(int, stems))) == len(stems):
        return np.argsort([int(stem) for stem in stems], kind="stable"), "index in the file names"
    return np.random.default_rng(seed).permutation(len(files)), f"seeded shuffle (seed {seed})"
