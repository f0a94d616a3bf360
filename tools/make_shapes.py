"""Write a small RGB image folder to try `--dataset folder` on: coloured shapes, one class per shape.

Each image is one shape (circle, square, triangle or cross: the class) of a random size, near the centre, on a random
dark, slightly noisy background, drawn at 4x and downsampled (antialiased), saved as PNG in
`<out>/<shape>/<index>.png` (torchvision's ImageFolder layout). Each class has its own hue (red, green, blue,
yellow; jittered, with random saturation and brightness), so a short run already shows whether the generator is
class-conditional, and a longer one whether it learns the shapes.
"""
import argparse
import colorsys
import os

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
HUES = (0.0, 0.33, 0.62, 0.15)  # red, green, blue, yellow
SUPERSAMPLE = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to create (one sub-folder per shape)")
    parser.add_argument("--per-class", type=int, default=1500, help="images per shape")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def bright_colour(hue: float, rng: np.random.Generator) -> tuple:
    hue = (hue + rng.uniform(-0.04, 0.04)) % 1.0
    red, green, blue = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.75, 1.0))
    return int(red * 255), int(green * 255), int(blue * 255)


def outline(shape: str, cx: float, cy: float, r: float) -> list:
    """Polygon corners of a square, triangle or cross of 'radius' r centred at (cx, cy)."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    w = r / 3  # cross: a plus sign of arm width 2w
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
            (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
            (cx - r, cy - w), (cx - w, cy - w)]


def draw(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    colour = bright_colour(HUES[SHAPES.index(shape)], rng)
    big = size * SUPERSAMPLE
    background = tuple(int(v) for v in rng.integers(0, 70, 3))
    image = Image.new("RGB", (big, big), background)
    r = rng.uniform(0.25, 0.38) * big
    cx, cy = big / 2 + rng.uniform(-0.12, 0.12, 2) * big  # near the centre, so that short runs can learn shapes
    canvas = ImageDraw.Draw(image)
    if shape == "circle":
        canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        canvas.polygon(outline(shape, cx, cy, r), fill=colour)
    small = np.asarray(image.resize((size, size), Image.LANCZOS), dtype=np.int16)
    noisy = small + rng.integers(-8, 9, small.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def main(args):
    rng = np.random.default_rng(args.seed)
    for shape in SHAPES:
        os.makedirs(os.path.join(args.out, shape), exist_ok=True)
        for i in range(args.per_class):
            draw(shape, args.size, rng).save(os.path.join(args.out, shape, f"{i:05d}.png"))
    print(f"{len(SHAPES)} classes x {args.per_class} images of {args.size}x{args.size} in {args.out}")


if __name__ == "__main__":
    main(parse_args())
