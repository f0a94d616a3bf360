"""The class-conditional discriminator, built to be made private by Opacus as it is.

The label enters as `num_classes` extra one-hot input planes (this beat a projection discriminator at the same
budget: docs/DESIGN.md, "GAN Slimming and compression"). No BatchNorm (it mixes samples, so per-sample gradients
would be meaningless) and no in-place activations (they break Opacus's hooks): `ModuleValidator.validate` finds no errors.

    [image ++ one-hot planes] 28x28 -> conv 14x14 -> conv 7x7 -> conv 7x7 kernel -> one logit
"""
import torch
import torch.nn.functional as F
from torch import nn


class Discriminator(nn.Module):
    def __init__(self, num_classes: int = 10, channels=(64, 128), image_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.num_classes, self.image_channels, self.image_size = num_classes, image_channels, image_size
        self.channels = tuple(int(c) for c in channels)
        d0, d1 = self.channels
        self.net = nn.Sequential(
            nn.Conv2d(image_channels + num_classes, d0, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(d0, d1, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(d1, 1, image_size // 4, 1, 0),
        )
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
