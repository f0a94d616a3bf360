"""The class-conditional discriminator, built to be made private by Opacus as it is.

The label enters as `num_classes` extra one-hot input planes (this beat a projection discriminator at the same
budget: docs/DESIGN.md, "GAN Slimming and compression"). No BatchNorm (it mixes samples, so per-sample gradients
would be meaningless) and no in-place activations (they break Opacus's hooks): `ModuleValidator.validate` finds
no errors.

    [image ++ one-hot planes] 28x28 -> conv 14x14 -> conv 7x7 -> conv 7x7 kernel -> one logit
    (32: 32-16-8-4 then a 4x4 kernel; 64: 64-32-16-8-4 then a 4x4 kernel; one width per strided conv)

The 28x28 layout is the original one: same parameter names (`net.0`, `net.2`, `net.4`), shapes and initialisation.
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.shapes import DEFAULT_DISCRIMINATOR_CHANNELS, check_image_shape, num_discriminator_downsamples


def discriminator_layers(in_channels: int, widths: tuple, last_kernel: int) -> list:
    """Strided 4x4 convs (each halving the side) with LeakyReLU, then the conv that gives the logit."""
    layers, previous = [], in_channels
    for width in widths:
        layers += [nn.Conv2d(previous, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        previous = width
    return layers + [nn.Conv2d(previous, 1, last_kernel, 1, 0)]


class Discriminator(nn.Module):
    def __init__(self, num_classes: int = 10, channels=None, image_channels: int = 1, image_size: int = 28):
        super().__init__()
        check_image_shape(image_size, image_channels)
        channels = DEFAULT_DISCRIMINATOR_CHANNELS[image_size] if channels is None else channels
        downsamples = num_discriminator_downsamples(image_size)
        if len(channels) != downsamples or min(channels) < 1:
            raise ValueError(f"discriminator channels must be {downsamples} positive widths for {image_size}x"
                             f"{image_size} images, got {list(channels)}")
        self.num_classes, self.image_channels, self.image_size = num_classes, image_channels, image_size
        self.channels = tuple(int(c) for c in channels)
        last_kernel = image_size // 2 ** downsamples
        self.net = nn.Sequential(*discriminator_layers(image_channels + num_classes, self.channels, last_kernel))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    def model_args(self) -> dict:
        return {"num_classes": self.num_classes, "channels": list(self.channels),
                "image_channels": self.image_channels, "image_size": self.image_size}

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One real-vs-fake logit per image."""
        planes = F.one_hot(labels, self.num_classes).to(images.dtype)[:, :, None, None]
        planes = planes.expand(-1, -1, images.shape[2], images.shape[3])
        return self.net(torch.cat([images, planes], dim=1)).flatten()
