"""Small folders of generated images (ImageFolder layout) for the tests of `--dataset folder`."""
import os

import numpy as np
from PIL import Image

CLASS_COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230))  # one dominant colour per class


def class_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (size, size, 3): dark noise plus a class-coloured bar whose position depends on the class."""
    image = rng.integers(0, 50, size=(size, size, 3))
    band = slice(size // 8 + label * size // 4, size // 8 + label * size // 4 + size // 4)
    image[band, size // 8: size - size // 8] = CLASS_COLOURS[label % len(CLASS_COLOURS)]
    return image.astype(np.uint8)


def write_image_folder(root: str, num_classes: int = 3, per_class: int = 40, size: int = 32, seed: int = 0,
                       extension: str = "png", grey: bool = False) -> str:
    """`root/class_<c>/img_<i>.<extension>` for every class c and image i; returns `root`."""
    rng = np.random.default_rng(seed)
    for label in range(num_classes):
        directory = os.path.join(root, f"class_{label}")
        os.makedirs(directory, exist_ok=True)
        for i in range(per_class):
            image = Image.fromarray(class_image(label, size, rng))
            image = image.convert("L") if grey else image
            image.save(os.path.join(directory, f"img_{i:03d}.{extension}"))
    return root
