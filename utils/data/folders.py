"""A user's own images: an ImageFolder-style directory, or CIFAR-10 in torchvision's layout, decoded once.

Folder layout (torchvision's `ImageFolder` convention): one sub-folder per class under `--data-root`, holding PNG,
JPEG or BMP files (searched recursively; names starting with '.' are skipped). Classes are the sorted sub-folder
names. The test set is either `DIR/test/<class>/` when `DIR` holds exactly `train/` and `test/`, or a fixed,
seeded hold-out of `HOLDOUT_FRACTION` of each class (at least one image) that is never trained on.

Every image is converted to 1 or 3 channels (`channels`; by default 1 when every file is greyscale, else 3) and,
when `image_size` is given, resized (shorter side, bilinear, antialiased) and centre-cropped to that square, as
torchvision's `Resize` + `CenterCrop` do. Without `image_size` all images must already share one square size of
28, 32 or 64.

The decoded set is cached in the data root as a uint8 (N, C, H, W) `.npy` (memory-mapped when read) with the
labels and test flags, next to a JSON file holding the *fingerprint of the file list*: a hash of every file's
relative name, size and modification time. Later stages read the cache without decoding; a file added, removed
or changed changes the fingerprint and the folder is decoded again. The same fingerprint names the data in the
privacy ledger (see `utils/data/datasets.py`). A read-only data root is decoded in memory each time instead.

CIFAR-10 (`cifar10`) is read from `cifar-10-batches-py/` under the data root (or the root itself): the five
training batches and `test_batch`, unpickled with only NumPy arrays allowed. Nothing is downloaded.
"""
import hashlib
import io
import json
import os
import pickle
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from models.shapes import IMAGE_SIZES
from utils.data.classes import CIFAR_CLASSES
from utils.run.cli import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 0
CACHE_VERSION = 1
CACHE_PREFIX = ".gan-cache"
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
SIZE_HINT = "pass --image-size 28, 32 or 64 to resize and centre-crop them"


@dataclass(frozen=True)
class ImageRequest:
    """The shape the user asked for: `image_size` None keeps the images' own size, `channels` None infers it."""
    image_size: int = None
    channels: int = None


@dataclass
class Listing:
    """What is on disk: the files to read (what the fingerprint covers) and, for a folder, each image's label."""
    root: str
    kind: str  # "folder" or "cifar10"
    classes: tuple
    files: list  # absolute paths, in reading order
    labels: list  # folder: one label per file; cifar10: empty (the labels are inside the batches)
    is_test: list  # folder: one flag per file; cifar10: empty
    fingerprint: str


@dataclass
class ImageSet:
    """A decoded image set: uint8 images (N, C, S, S), labels, test flags, classes and the file-list fingerprint."""
    images: np.ndarray
    labels: np.ndarray
    is_test: np.ndarray
    classes: tuple
    fingerprint: str
    source: str

    def part(self, name: str) -> tuple:
        """(images uint8 tensor, labels int64 tensor) of the 'train' or 'test' part, in listing order."""
        mask = self.is_test if name == "test" else ~self.is_test
        images = torch.from_numpy(np.ascontiguousarray(self.images[mask]))
        return images, torch.from_numpy(self.labels[mask].astype(np.int64))


# ---------------------------------------------------------------- listing

def files_fingerprint(root: str, files: list) -> str:
    """Hash of every file's name relative to `root`, size and modification time."""
    records = []
    for path in files:
        info = os.stat(path)
        records.append([os.path.relpath(path, root), info.st_size, info.st_mtime_ns])
    return hashlib.sha256(json.dumps(records).encode()).hexdigest()[:16]


def visible_dirs(directory: str) -> list:
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))


def images_under(directory: str) -> list:
    """Image files under `directory` (recursively, hidden names skipped), sorted."""
    found = []
    for parent, dirs, names in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(parent, n) for n in sorted(names)
                  if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def class_folders(root: str) -> list:
    """The class sub-folders of `root`, checked: at least two, none empty."""
    classes = visible_dirs(root)
    if not classes:
        what = "is empty" if not os.listdir(root) else "has no class sub-folders"
        raise UserError(f"--data-root {root} {what}: expected one sub-folder of images per class (ImageFolder "
                        f"layout, PNG/JPEG/BMP)")
    if len(classes) < 2:
        raise UserError(f"--data-root {root} has only one class folder ({classes[0]!r}): at least two are needed")
    for name in classes:
        if not images_under(os.path.join(root, name)):
            raise UserError(f"class folder {os.path.join(root, name)} has no images (PNG, JPEG or BMP)")
    return classes


def holdout_flags(labels: list, root: str, classes: list) -> list:
    """A seeded HOLDOUT_FRACTION of each class (at least one image) is the test set."""
    labels = np.asarray(labels)
    flags = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(HOLDOUT_SEED)
    for label, name in enumerate(classes):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            raise UserError(f"class folder {os.path.join(root, name)} has only 1 image: at least 2 are needed "
                            f"(a tenth of each class is held out as the test set)")
        count = max(1, int(round(HOLDOUT_FRACTION * len(members))))
        flags[rng.permutation(members)[:count]] = True
    return flags.tolist()


def list_folder(root: str) -> Listing:
    """The images of an ImageFolder-style directory (with `train/` + `test/`, or a held-out test part)."""
    if not os.path.isdir(root):
        raise UserError(f"--data-root {root} is not a directory")
    split_layout = visible_dirs(root) == ["test", "train"]
    parts = ["train", "test"] if split_layout else [None]
    classes = class_folders(os.path.join(root, "train") if split_layout else root)
    files, labels, is_test = [], [], []
    for part in parts:
        base = os.path.join(root, part) if part else root
        if part == "test" and class_folders(base) != classes:
            raise UserError(f"{base} must hold the same class folders as {os.path.join(root, 'train')}")
        for label, name in enumerate(classes):
            found = images_under(os.path.join(base, name))
            files += found
            labels += [label] * len(found)
            is_test += [part == "test"] * len(found)
    if not split_layout:
        is_test = holdout_flags(labels, root, classes)
    return Listing(root, "folder", tuple(classes), files, labels, is_test, files_fingerprint(root, files))


def list_cifar10(root: str) -> Listing:
    """The batch files of CIFAR-10 in torchvision's layout under `root`."""
    for directory in (os.path.join(root, CIFAR_DIR), root):
        files = [os.path.join(directory, name) for name in CIFAR_TRAIN + (CIFAR_TEST,)]
        if all(os.path.isfile(path) for path in files):
            return Listing(root, "cifar10", CIFAR_CLASSES, files, [], [], files_fingerprint(root, files))
    raise UserError(f"CIFAR-10 not found under --data-root {root}: put torchvision's '{CIFAR_DIR}' folder there "
                    f"(unpacked from cifar-10-python.tar.gz); nothing is downloaded")


# ---------------------------------------------------------------- decoding

def unreadable(path: str, exc: Exception) -> UserError:
    if isinstance(exc, UnidentifiedImageError):
        return UserError(f"cannot read image {path}: not a PNG, JPEG or BMP image that PIL can decode")
    return UserError(f"cannot read image {path}: corrupt or truncated ({exc or type(exc).__name__})")


def open_image(path: str) -> Image.Image:
    """The fully decoded image, or one line naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # OSError: also unidentified
        raise unreadable(path, exc) from exc


def header(path: str) -> tuple:
    """(mode, (width, height)) without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.mode, image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise unreadable(path, exc) from exc


def resolve_folder_shape(listing: Listing, request: ImageRequest) -> tuple:
    """(image size, channels) of a folder: the request, or what every file's header agrees on."""
    headers = [header(path) for path in listing.files]
    channels = request.channels or (1 if all(mode in GREY_MODES for mode, _ in headers) else 3)
    if request.image_size:
        return request.image_size, channels
    sizes = {}
    for path, (_, size) in zip(listing.files, headers):
        sizes.setdefault(size, path)
    if len(sizes) > 1:
        (a, pa), (b, pb) = list(sizes.items())[:2]
        raise UserError(f"images in {listing.root} have different sizes ({pa}: {a[0]}x{a[1]}, {pb}: {b[0]}x{b[1]}): "
                        f"{SIZE_HINT}")
    width, height = next(iter(sizes))
    if width != height or width not in IMAGE_SIZES:
        raise UserError(f"images in {listing.root} are {width}x{height}: {SIZE_HINT}")
    return width, channels


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (bilinear; PIL antialiases when shrinking), then the centre `size` x `size` square:
    the arithmetic of torchvision's `Resize(size)` + `CenterCrop(size)` on PIL images."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    if width <= height:
        new_size = (size, int(size * height / width))
    else:
        new_size = (int(size * width / height), size)
    image = image.resize(new_size, Image.BILINEAR)
    left, top = int(round((new_size[0] - size) / 2.0)), int(round((new_size[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_array(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """uint8 (C, S, S): converted to L or RGB, resized and centre-cropped to S."""
    image = resize_and_crop(image.convert("L" if channels == 1 else "RGB"), image_size)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


class _NumpyOnly(pickle.Unpickler):
    """CIFAR-10's batches are pickles: allow only what rebuilds NumPy arrays, never arbitrary code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # encode: bytes in protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused object {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: str) -> tuple:
    """(uint8 images (N, 3, 32, 32), labels) of one CIFAR-10 batch file."""
    try:
        with open(path, "rb") as handle:
            batch = _NumpyOnly(io.BytesIO(handle.read()), encoding="latin1").load()
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as exc:
        raise UserError(f"cannot read CIFAR-10 batch {path}: {exc} (corrupt or not a CIFAR-10 batch)") from exc
    if len(images) != len(labels):
        raise UserError(f"CIFAR-10 batch {path} holds {len(images)} images but {len(labels)} labels")
    return images, labels


def fill_from_folder(listing: Listing, images: np.ndarray) -> tuple:
    """Decode every file of a folder into `images` (N, C, S, S); returns (labels, test flags)."""
    size, channels = images.shape[2], images.shape[1]
    for i, path in enumerate(listing.files):
        images[i] = to_array(open_image(path), size, channels)
    return np.asarray(listing.labels, dtype=np.int64), np.asarray(listing.is_test, dtype=bool)


def fill_from_cifar(batches: list, images: np.ndarray) -> tuple:
    """Copy (or convert) CIFAR-10's batches, the test batch last, into `images`; returns (labels, test flags)."""
    size, channels = images.shape[2], images.shape[1]
    native = (size, channels) == (32, 3)
    position = 0
    for batch_images, _ in batches:
        if native:
            images[position:position + len(batch_images)] = batch_images
        else:
            for offset, image in enumerate(batch_images):
                images[position + offset] = to_array(Image.fromarray(image.transpose(1, 2, 0)), size, channels)
        position += len(batch_images)
    labels = np.concatenate([batch_labels for _, batch_labels in batches])
    return labels, np.arange(len(labels)) >= len(labels) - len(batches[-1][1])


# ---------------------------------------------------------------- the cache

def cache_paths(root: str, request: ImageRequest) -> dict:
    stem = os.path.join(root, f"{CACHE_PREFIX}-{request.image_size or 'native'}-{request.channels or 'auto'}")
    return {name: f"{stem}.{name}" for name in ("json", "images.npy", "labels.npy", "test.npy")}


def caches_to_try(root: str, request: ImageRequest) -> list:
    """The cache of this request first; for a fully given shape also the others, any of which may hold the same
    pixels (e.g. the first stage's '<native>-<auto>' cache when a later stage asks for the shape it resolved to)."""
    own = cache_paths(root, request)
    if not (request.image_size and request.channels):
        return [own]
    others = sorted(name[:-len(".json")] for name in os.listdir(root)
                    if name.startswith(CACHE_PREFIX) and name.endswith(".json"))
    return [own] + [{key: os.path.join(root, f"{stem}.{key}") for key in own} for stem in others
                    if os.path.join(root, f"{stem}.json") != own["json"]]


def read_cache(paths: dict, listing: Listing, request: ImageRequest = ImageRequest()):
    """The cached ImageSet if it was decoded from exactly this file list at the requested shape, else None."""
    try:
        with open(paths["json"]) as handle:
            meta = json.load(handle)
        if meta.get("version") != CACHE_VERSION or meta.get("fingerprint") != listing.fingerprint:
            return None
        images = np.load(paths["images.npy"], mmap_mode="r")
        labels, is_test = np.load(paths["labels.npy"]), np.load(paths["test.npy"])
    except (OSError, ValueError):
        return None
    if list(images.shape) != meta.get("shape") or not len(images) == len(labels) == len(is_test):
        return None
    if (request.channels or images.shape[1], request.image_size or images.shape[2]) != images.shape[1:3]:
        return None
    return ImageSet(images, labels, is_test, listing.classes, listing.fingerprint, f"{listing.root} (cached)")


class CacheWriter:
    """Decodes straight into a memory-mapped temporary file, renamed into place only when complete; in memory when
    the data root is read-only. The JSON file with the fingerprint is written last: it vouches for the arrays."""

    def __init__(self, paths: dict):
        self.paths, self.temporary = paths, {k: f"{v}.tmp.{os.getpid()}" for k, v in paths.items()}
        self.on_disk = True

    def allocate(self, shape: tuple) -> np.ndarray:
        try:
            return np.lib.format.open_memmap(self.temporary["images.npy"], "w+", np.uint8, shape)
        except OSError:
            print(f"note: cannot write the decode cache next to the images ({self.paths['json']}): decoding in "
                  f"memory, again on every run", file=sys.stderr)
            self.on_disk = False
            return np.empty(shape, np.uint8)

    def commit(self, images: np.ndarray, labels: np.ndarray, is_test: np.ndarray, listing: Listing) -> ImageSet:
        if self.on_disk:
            images.flush()
            for name, array in (("labels.npy", labels), ("test.npy", is_test)):
                with open(self.temporary[name], "wb") as handle:
                    np.save(handle, array)
            meta = {"version": CACHE_VERSION, "fingerprint": listing.fingerprint, "shape": list(images.shape),
                    "classes": list(listing.classes), "kind": listing.kind}
            with open(self.temporary["json"], "w") as handle:
                json.dump(meta, handle)
            for name in ("images.npy", "labels.npy", "test.npy", "json"):
                os.replace(self.temporary[name], self.paths[name])
            images = np.load(self.paths["images.npy"], mmap_mode="r")
        return ImageSet(images, labels, is_test, listing.classes, listing.fingerprint, listing.root)

    def discard(self):
        for path in self.temporary.values():
            if os.path.exists(path):
                os.remove(path)


def decode(listing: Listing, request: ImageRequest, paths: dict) -> ImageSet:
    """Decode a listing at the requested shape into the cache (see the module docstring)."""
    if listing.kind == "folder":
        size, channels = resolve_folder_shape(listing, request)
        count, fill = len(listing.files), lambda out: fill_from_folder(listing, out)
    else:
        size, channels = request.image_size or 32, request.channels or 3
        batches = [read_cifar_batch(path) for path in listing.files]
        count, fill = sum(len(labels) for _, labels in batches), lambda out: fill_from_cifar(batches, out)
    writer = CacheWriter(paths)
    try:
        images = writer.allocate((count, channels, size, size))
        labels, is_test = fill(images)
        return writer.commit(images, labels, is_test, listing)
    finally:
        writer.discard()


def load_image_set(kind: str, root: str, request: ImageRequest = ImageRequest()) -> ImageSet:
    """A folder ('folder') or CIFAR-10 ('cifar10') under `root`, decoded once and read from the cache after."""
    if request.image_size is not None and request.image_size not in IMAGE_SIZES:
        raise UserError(f"--image-size {request.image_size}: choose 28, 32 or 64")
    if request.channels not in (None, 1, 3):
        raise UserError(f"--channels {request.channels}: choose 1 or 3")
    if not os.path.isdir(root):
        raise UserError(f"--data-root {root} is not a directory")
    listing = list_folder(root) if kind == "folder" else list_cifar10(root)
    for paths in caches_to_try(root, request):
        cached = read_cache(paths, listing, request)
        if cached is not None:
            return cached
    return decode(listing, request, cache_paths(root, request))
