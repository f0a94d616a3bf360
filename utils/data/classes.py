"""The class names of a generator's data, label i being name i: the names generate.py writes into a released set
and the demo page (utils/evaluation/web_demo.py) shows (docs/DESIGN.md, "Releasing a synthetic dataset").

The named sets' lists are written out here (`KNOWN_CLASS_NAMES`: torchvision's `FashionMNIST.classes` and
`MNIST.classes`, which tests/test_generate.py holds equal, and CIFAR-10's), so that generate.py's --onnx path has
them without torch; a user's folder's names are its class folders, found at the run's recorded --data-root while it
still lists them. Imports no torch (only listing a folder does, through utils/data/folders.py).
"""
import os

from utils.run.checkpoint import lineage, load_checkpoint
from utils.run.cli import UserError

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
MNIST_CLASSES = ("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
                 "8 - eight", "9 - nine")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
KNOWN_CLASS_NAMES = {"fashion-mnist": FASHION_MNIST_CLASSES, "mnist": MNIST_CLASSES, "cifar10": CIFAR_CLASSES}


def dataset_class_names(checkpoint: dict) -> list:
    """The class names of the data the run was trained on (label i is name i), or None where unknown: a named set's,
    or the class folders of a user's folder (still on disk at the recorded --data-root)."""
    dataset = (checkpoint.get("privacy") or {}).get("dataset") or (checkpoint.get("data") or {}).get("dataset")
    if dataset in KNOWN_CLASS_NAMES:
        return list(KNOWN_CLASS_NAMES[dataset])
    if dataset != "folder":
        return None
    from utils.data.folders import list_folder  # imports torch
    runs = [checkpoint] + [load_checkpoint(r) for r in lineage(checkpoint).values() if r]
    root = next((run["args"].get("data_root") for run in runs if run["args"].get("data_root")), None)
    try:
        return list(list_folder(root).classes) if root and os.path.isdir(root) else None
    except UserError:  # the folder changed since: the names may not be the model's
        return None


def class_names(checkpoint: dict, num_classes: int, given=None) -> list:
    """`given` (a command-line list), else the dataset's names (`dataset_class_names`), else "class 0", ..."""
    return fitting_names(num_classes, given, dataset_class_names(checkpoint))


def fitting_names(num_classes: int, *candidates) -> list:
    """The first of `candidates` with one name per class, else "class 0", "class 1", ..."""
    for names in candidates:
        if names and len(names) == num_classes:
            return list(names)
    return [f"class {label}" for label in range(num_classes)]
