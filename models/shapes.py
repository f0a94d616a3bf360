"""Which layers the networks have for each image size (28, 32 or 64 pixels, square, 1 or 3 channels).

The generator starts from a small square and doubles it block by block up to the image size:

    28: 7 -> 14 -> 28            (3 blocks, the first a 7x7 transposed conv of the 1x1 input)
    32: 4 -> 8 -> 16 -> 32       (4 blocks, the first a 4x4 transposed conv)
    64: 4 -> 8 -> 16 -> 32 -> 64 (5 blocks)

The discriminator halves the image with strided 4x4 convs down to the same small square (7 or 4), then one conv
with a kernel of that size gives the logit. It may have one more width than it has halvings: one more strided 3x3
conv (7 -> 4, or 4 -> 2; the DCGAN discriminator of Bie, Kamath & Zhang 2023), and the logit's kernel is then
that smaller side. Every block of the generator is prunable (GAN Slimming), so the names of the prunable layers
depend on the size: `prunable_layers(image_size)`.
"""
IMAGE_SIZES = (28, 32, 64)
IMAGE_CHANNELS = (1, 3)
START_SIDE = {28: 7, 32: 4, 64: 4}
DEFAULT_GENERATOR_CHANNELS = {28: (256, 128, 64), 32: (512, 256, 128, 64), 64: (512, 256, 128, 64, 32)}
DEFAULT_DISCRIMINATOR_CHANNELS = {28: (64, 128), 32: (64, 128, 256), 64: (32, 64, 128, 256)}


def check_image_shape(image_size: int, image_channels: int):
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image size must be one of {IMAGE_SIZES}, got {image_size}")
    if image_channels not in IMAGE_CHANNELS:
        raise ValueError(f"image channels must be 1 or 3, got {image_channels}")


def generator_sides(image_size: int) -> list:
    """The side of each generator block's output, e.g. [4, 8, 16, 32] for 32."""
    sides = [START_SIDE[image_size]]
    while sides[-1] < image_size:
        sides.append(sides[-1] * 2)
    return sides


def num_generator_blocks(image_size: int) -> int:
    return len(generator_sides(image_size))


def num_discriminator_downsamples(image_size: int) -> int:
    """Strided convs from the image down to the start side (2 for 28, 3 for 32, 4 for 64)."""
    return num_generator_blocks(image_size) - 1


def discriminator_widths_allowed(image_size: int) -> tuple:
    """How many widths a discriminator may have: one per halving, or one more (2 or 3 for 28, 3 or 4 for 32)."""
    downsamples = num_discriminator_downsamples(image_size)
    return downsamples, downsamples + 1


def discriminator_last_side(image_size: int, num_widths: int) -> int:
    """The side the logit conv sees: the start side (7 or 4), or half of it rounded up after the extra
    3x3 stride-2 conv (7 -> 4, 4 -> 2)."""
    side = START_SIDE[image_size]
    return side if num_widths == num_discriminator_downsamples(image_size) else (side + 1) // 2


def prunable_layers(image_size: int = 28) -> tuple:
    """Names of the generator's prunable blocks for this image size: ('block0', 'block1', ...)."""
    return tuple(f"block{i}" for i in range(num_generator_blocks(image_size)))
