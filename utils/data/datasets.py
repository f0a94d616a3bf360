"""Datasets and the public/private partition (docs/DESIGN.md, "Data and the partition").

Built-in sets (Fashion-MNIST, MNIST), in order: `--data-root` (raw IDX files, with or without .gz, directly there
or in torchvision's `<Name>/raw/` layout), Debian's `/usr/share/datasets/fashion-mnist`, then torchvision's
download. Debian's .gz files fail torchvision's md5 check, so the IDX files are read here directly.
A user's own images (`folder`, an ImageFolder-style directory) and CIFAR-10 (`cifar10`, torchvision's layout) are
read by `utils/data/folders.py`, at `--image-size` and `--channels`, from a decode cache.

A split is held in memory as uint8 (N, H, W) or (N, C, H, W); batches are scaled to [-1, 1] with a channel axis.
`public` and `private` are a disjoint, seeded partition of the training set with a fingerprint of the index set
(for `folder`/`cifar10`, of the index set and the fingerprint of the file list, so that another folder or a
changed file is a different split); the test set is never trained on. `seeded_subset` cuts a split to a seeded
draw of N of its images (a small-data positive control, or an audit run on few images) and records which.
"""
import gzip
import hashlib
import os
import struct
from dataclasses import dataclass, replace

import numpy as np
import torch

from utils.data.folders import ImageRequest, load_image_set
from utils.run.cli import UserError

DATASETS = {
    "fashion-mnist": {"torchvision": "FashionMNIST", "debian": "/usr/share/datasets/fashion-mnist",
                      "package": "dataset-fashion-mnist", "num_classes": 10},
    "mnist": {"torchvision": "MNIST", "debian": None, "package": None, "num_classes": 10},
}
IMAGE_SET_DATASETS = ("folder", "cifar10")  # read by utils/data/folders.py, any size and colour
SPLITS = ("all", "public", "private")
SUBSET_SEED_OFFSET = 49979687  # a subset's draw differs from --seed's other generators
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass
class ImageSplit:
    """One split of a dataset in memory: uint8 images (N, H, W), int64 labels, and where it came from."""
    images: torch.Tensor
    labels: torch.Tensor
    dataset: str
    split: str
    # positions in the training (or test) set of the split (a subset or an audit split keeps its parent's: the
    # fingerprint names the split the privacy ledger's guarantee is about)
    indices: torch.Tensor
    source: str
    partition: dict  # the private partition this split belongs to (what the privacy ledger records)
    list_fingerprint: str = None  # folder/cifar10: fingerprint of the file list the indices point into
    classes: tuple = None  # folder/cifar10: the class names (label i is classes[i])
    subset: dict = None  # a seeded subset (`seeded_subset`): of which split, size, seed, fingerprint of its images

    def __len__(self):
        return len(self.labels)

    @property
    def fingerprint(self) -> str:
        return index_fingerprint(self.indices, self.list_fingerprint)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else DATASETS[self.dataset]["num_classes"]

    @property
    def image_shape(self) -> tuple:
        """(channels, height, width) of every image."""
        return tuple(self.images.shape[1:]) if self.images.dim() == 4 else (1, *self.images.shape[1:])

    def batch(self, positions) -> tuple:
        """Images scaled to [-1, 1] with a channel axis, and labels."""
        return to_unit_range(self.images[positions]), self.labels[positions]


def to_unit_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W) or (N, C, H, W) -> float (N, C, H, W) in [-1, 1]."""
    images = images_uint8.float()
    return (images.unsqueeze(1) if images.dim() == 3 else images) / 127.5 - 1.0


def index_fingerprint(indices: torch.Tensor, list_fingerprint: str = None) -> str:
    """Short hash of a sorted index set (and of the file list it indexes, when given): two runs used the same
    partition iff their fingerprints agree."""
    ordered = np.sort(np.asarray(indices, dtype=np.int64))
    digest = hashlib.sha256(ordered.tobytes())
    if list_fingerprint is not None:
        digest.update(list_fingerprint.encode())
    return digest.hexdigest()[:16]


def subset_positions(count: int, size: int, seed: int) -> torch.Tensor:
    """`size` sorted positions of `count`, a seeded draw (the same for the same count, size and seed)."""
    if not 0 < size <= count:
        raise UserError(f"a subset of {size} images must be between 1 and the split's {count}")
    generator = torch.Generator().manual_seed(seed + SUBSET_SEED_OFFSET)
    return torch.randperm(count, generator=generator)[:size].sort().values


def seeded_subset(split: ImageSplit, size: int, seed: int) -> ImageSplit:
    """`size` images of `split` from a seeded draw. The subset keeps `split`'s indices (and fingerprint: the
    ledger's guarantee is about the whole split, and a draw fixed in advance reads at most each of its images
    once); which images it holds is in `subset` (`subset_ids` rebuilds them from that record)."""
    positions = subset_positions(len(split), size, seed)
    record = {"of": split.split, "size": size, "seed": seed,
              "fingerprint": index_fingerprint(split.indices[positions], split.list_fingerprint)}
    return replace(split, images=split.images[positions], labels=split.labels[positions], subset=record)


def subset_ids(split: ImageSplit, record: dict) -> torch.Tensor:
    """The training-set positions of the subset `record` (`seeded_subset`) of `split`, checked against it."""
    if record["of"] != split.split:
        raise ValueError(f"the subset is of the {record['of']} split, not of {split.split!r}")
    ids = split.indices[subset_positions(len(split), record["size"], record["seed"])]
    if index_fingerprint(ids, split.list_fingerprint) != record["fingerprint"]:
        raise UserError(f"the recorded subset of the {split.split} split ({record['size']} images, seed "
                        f"{record['seed']}) is not this one: use the --data-root, --public-size and "
                        f"--partition-seed of its run")
    return ids


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def _find_idx(directory: str, stem: str):
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _read_from_dir(directory: str, part: str):
    """(images, labels) from IDX files in `directory`, or None if they are not all there."""
    paths = [_find_idx(directory, stem) for stem in IDX_FILES[part]]
    if None in paths:
        return None
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"IDX files in {directory} do not hold matching images and labels")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _candidate_dirs(dataset: str, data_root: str):
    info = DATASETS[dataset]
    if data_root:
        yield data_root
        yield os.path.join(data_root, "raw")
        yield os.path.join(data_root, info["torchvision"], "raw")
    if info["debian"]:
        yield info["debian"]


def _torchvision_download(dataset: str, data_root: str, part: str):
    try:
        import torchvision
        cls = getattr(torchvision.datasets, DATASETS[dataset]["torchvision"])
        data = cls(data_root or "data", train=(part == "train"), download=True)
        return data.data.clone(), data.targets.clone().long()
    except Exception:  # offline, md5 mismatch, ...: the caller explains every way to get the data
        return None


def how_to_get(dataset: str, data_root: str) -> str:
    info = DATASETS[dataset]
    ways = [f"put the IDX files (train-images-idx3-ubyte[.gz] ...) in --data-root (now {data_root!r})"]
    if info["package"]:
        ways.append(f"'apt-get install {info['package']}' (files in {info['debian']})")
    ways.append("run once with internet access so torchvision can download it")
    return f"dataset {dataset!r} not found: " + "; or ".join(ways)


def load_dataset(dataset: str, data_root: str = "data", part: str = "train"):
    """(images uint8 (N, H, W), labels int64, source) of the training or test set."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}: choose from {', '.join(DATASETS)}")
    if data_root and not os.path.isdir(data_root) and data_root != "data":
        raise UserError(f"--data-root {data_root!r} is not a directory. " + how_to_get(dataset, data_root))
    for directory in _candidate_dirs(dataset, data_root):
        found = _read_from_dir(directory, part)
        if found is not None:
            return found[0], found[1], directory
    found = _torchvision_download(dataset, data_root, part)
    if found is not None:
        return found[0], found[1], "torchvision"
    raise UserError(how_to_get(dataset, data_root))


def partition(num_train: int, public_size: int, partition_seed: int = 0):
    """Disjoint, seeded (public, private) index sets of the training set, each sorted."""
    if not 0 < public_size < num_train:
        raise UserError(f"--public-size {public_size} must be between 1 and {num_train - 1} "
                        f"(the training set has {num_train} images)")
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(partition_seed))
    return order[:public_size].sort().values, order[public_size:].sort().values


@dataclass
class LoadedPart:
    """The training or test set of a dataset, before any partition."""
    images: torch.Tensor
    labels: torch.Tensor
    source: str
    list_fingerprint: str = None
    classes: tuple = None


def load_parts(dataset: str, data_root: str, request: ImageRequest, need_test: bool) -> tuple:
    """(training set, test set or None) as `LoadedPart`s."""
    if dataset in IMAGE_SET_DATASETS:
        image_set = load_image_set(dataset, data_root, request or ImageRequest())
        parts = [LoadedPart(*image_set.part(name), image_set.source, image_set.fingerprint, image_set.classes)
                 for name in ("train", "test")]
        return parts[0], parts[1] if need_test else None
    if request is not None and (request.image_size or 28, request.channels or 1) != (28, 1):
        raise UserError(f"--image-size and --channels apply to --dataset folder or cifar10; {dataset} is 28x28 grey")
    train = LoadedPart(*load_dataset(dataset, data_root, "train"))
    return train, LoadedPart(*load_dataset(dataset, data_root, "test")) if need_test else None


def load_split(dataset: str, split: str, data_root: str = "data", public_size: int = 10000,
               partition_seed: int = 0, request: ImageRequest = None) -> ImageSplit:
    """The training split `all | public | private`, or `test`; `request` sets the shape of folder/cifar10 images."""
    if dataset not in DATASETS and dataset not in IMAGE_SET_DATASETS:
        raise UserError(f"unknown dataset {dataset!r}: choose from {', '.join((*DATASETS, *IMAGE_SET_DATASETS))}")
    if split not in SPLITS + ("test",):
        raise UserError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
    train, test = load_parts(dataset, data_root, request, need_test=split == "test")
    public, private = partition(len(train.labels), public_size, partition_seed)
    data = test if split == "test" else train
    indices = {"public": public, "private": private}.get(split, torch.arange(len(data.labels)))
    info = {"dataset": dataset, "private_fingerprint": index_fingerprint(private, train.list_fingerprint),
            "private_size": len(private), "public_size": public_size, "partition_seed": partition_seed}
    return ImageSplit(data.images[indices], data.labels[indices], dataset, split, indices, data.source, info,
                      train.list_fingerprint, train.classes)


def add_data_args(parser, default_split: str = "public"):
    """--dataset, --data-root, the partition's flags and --split (none with `default_split=None`: a script that
    reads several splits, like evaluate.py)."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default="fashion-mnist", choices=sorted(DATASETS) + list(IMAGE_SET_DATASETS),
                       help="'folder': your own images, one sub-folder per class under --data-root; 'cifar10': "
                            "torchvision's cifar-10-batches-py under --data-root (never downloaded)")
    group.add_argument("--data-root", default="data", help="directory with the dataset's files")
    group.add_argument("--image-size", type=int, choices=(28, 32, 64), default=None,
                       help="folder/cifar10: resize and centre-crop to this square (default: the images' own size)")
    group.add_argument("--channels", type=int, choices=(1, 3), default=None,
                       help="folder/cifar10: 1 (grey) or 3 (RGB) (default: 1 if every image is grey, else 3)")
    if default_split is not None:
        group.add_argument("--split", default=default_split, choices=SPLITS,
                           help="training split; 'private' or 'all' without DP makes the final epsilon infinite")
    group.add_argument("--public-size", type=int, default=10000, help="size of the public part of the partition")
    group.add_argument("--partition-seed", type=int, default=0,
                       help="seed of the public/private partition (keep it fixed across stages)")


def image_request(args, model_args: dict = None) -> ImageRequest:
    """The image shape to load: --image-size/--channels when given, else (folder/cifar10) the shape the model in
    `model_args` was built for, so that a later stage reads the data as the first stage did with no flags."""
    built_for = model_args if model_args and args.dataset in IMAGE_SET_DATASETS else {}
    # getattr: the saved args of a run from before image sizes existed have neither option
    return ImageRequest(getattr(args, "image_size", None) or built_for.get("image_size"),
                        getattr(args, "channels", None) or built_for.get("image_channels"))


def model_shape(split: ImageSplit) -> dict:
    """The shape arguments a Generator or Discriminator for this data takes (and records in its model_args)."""
    channels, height, width = split.image_shape
    return {"num_classes": split.num_classes, "image_channels": channels, "image_size": height}


def check_data_fits(split: ImageSplit, model_args: dict):
    """Refuse data of another shape or class count than the model was built for (one line, naming both)."""
    built_for = {"num_classes": model_args["num_classes"],
                 "image_channels": model_args.get("image_channels", 1), "image_size": model_args.get("image_size", 28)}
    if model_shape(split) != built_for:
        have, want = model_shape(split), built_for
        raise UserError(f"the {split.dataset} data is {have['image_channels']}x{have['image_size']}x"
                        f"{have['image_size']} with {have['num_classes']} classes, but the model was built for "
                        f"{want['image_channels']}x{want['image_size']}x{want['image_size']} with "
                        f"{want['num_classes']}: use the --dataset, --data-root and --image-size/--channels of "
                        f"the first stage")


class EpochBatches:
    """Seeded shuffled mini-batches over a split: epoch `e` has the same order on every run (resume-safe)."""

    def __init__(self, split: ImageSplit, batch_size: int, seed: int, drop_last: bool = True):
        self.split, self.batch_size, self.seed, self.drop_last = split, batch_size, seed, drop_last

    def __len__(self):
        full, rest = divmod(len(self.split), self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def order(self, epoch: int) -> torch.Tensor:
        """The positions of epoch `epoch` in batch order (a function of the seed and the epoch only)."""
        return torch.randperm(len(self.split), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def epoch(self, epoch: int, start: int = 0):
        """Yield (images, labels) batches of `epoch`, skipping the first `start` batches."""
        order = self.order(epoch)
        for i in range(start, len(self)):
            yield self.split.batch(order[i * self.batch_size:(i + 1) * self.batch_size])


class SplitDataset(torch.utils.data.Dataset):
    """A split as a map-style Dataset (for Opacus's Poisson-sampling loader); batched reads via __getitems__."""

    def __init__(self, split: ImageSplit):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        images, labels = self.split.batch(torch.tensor([i]))
        return images[0], labels[0]

    def __getitems__(self, indices):
        images, labels = self.split.batch(torch.as_tensor(indices, dtype=torch.long))
        return list(zip(images, labels))
