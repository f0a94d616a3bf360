"""The class-conditional discriminator, built to be made private by Opacus as it is.

The label enters as `num_classes` extra one-hot input planes (this beat a projection discriminator at the same
budget: docs/DESIGN.md, "GAN Slimming and compression"). No BatchNorm (it mixes samples, so per-sample gradients
would be meaningless) and no in-place activations (they break Opacus's hooks): `ModuleValidator.validate` finds
no errors (unless the minibatch std layer below is on).

    [image ++ one-hot planes] 28x28 -> conv 14x14 -> conv 7x7 -> conv 7x7 kernel -> one logit
    (32: 32-16-8-4 then a 4x4 kernel; 64: 64-32-16-8-4 then a 4x4 kernel; one width per strided conv)

The 28x28 layout is the original one: same parameter names (`net.0`, `net.2`, `net.4`), shapes and initialisation.

Two options (off by default):

- Capacity: one more width than halvings adds a strided 3x3 conv (28: 28-14-7-4 then a 4x4 kernel, as the DCGAN
  discriminator of Bie, Kamath & Zhang 2023 with widths 128/256/512). Opacus handles it like the other convs.
- `minibatch_std=G`: StyleGAN's minibatch standard deviation layer (Karras et al.) before the logit conv, which
  lets D see how varied a group of G samples is and so penalise a generator that collapses to few images. It
  MIXES SAMPLES: one sample's logit depends on the others of its group, so its "per-sample" gradient depends on
  other records, and clipping it no longer bounds one record's influence on the update. It is for the non-private
  teacher and must never be in a discriminator that DP-SGD trains: `utils.privacy.dp.PrivateDiscriminator` refuses it,
  Opacus's validator rejects it (registered in `utils/privacy/dp.py`), and `fine_tune.py` strips it
  (`Discriminator.without_minibatch_std`).
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.shapes import (DEFAULT_DISCRIMINATOR_CHANNELS, check_image_shape, discriminator_last_side,
                           discriminator_widths_allowed, num_discriminator_downsamples)

MINIBATCH_STD_EPSILON = 1e-8  # inside the square root (StyleGAN's): a finite gradient where a group's std is 0


def std_group_size(batch_size: int, group_size: int) -> int:
    """The group size used: the largest divisor of the batch size not above `group_size` (1 for a batch of 1)."""
    return next(d for d in range(max(1, min(group_size, batch_size)), 0, -1) if batch_size % d == 0)


class MinibatchStdDev(nn.Module):
    """Appends one channel: for each group of consecutive samples, the std over the group of every feature at every
    pixel, averaged to one number, the same for every sample of the group at every pixel. No learned weights."""

    def __init__(self, group_size: int):
        super().__init__()
        self.group_size = int(group_size)
        # Empty: it only makes Opacus look at this layer. `ModuleValidator` visits only modules that own a
        # trainable parameter, so without it the validator registered in utils/privacy/dp.py would never run.
        self.opacus_visible = nn.Parameter(torch.empty(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C + 1, H, W), the std feature last."""
        n, c, h, w = x.shape
        g = std_group_size(n, self.group_size)
        groups = x.float().reshape(n // g, g, c, h, w)  # float32 statistics, also under bf16 autocast
        std = torch.sqrt(groups.var(dim=1, unbiased=False) + MINIBATCH_STD_EPSILON).mean(dim=(1, 2, 3))
        feature = std.view(n // g, 1, 1, 1, 1).expand(n // g, g, 1, h, w).reshape(n, 1, h, w)
        return torch.cat([x, feature.to(x.dtype)], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


def discriminator_layers(in_channels: int, widths: tuple, downsamples: int, last_kernel: int,
                         minibatch_std: int) -> list:
    """Strided 4x4 convs (each halving the side), a strided 3x3 one for a width beyond the halvings, each with
    LeakyReLU, the minibatch std layer if asked for, then the conv that gives the logit."""
    layers, previous = [], in_channels
    for i, width in enumerate(widths):
        kernel = 4 if i < downsamples else 3  # 3, stride 2, padding 1: 7 -> 4, 4 -> 2
        layers += [nn.Conv2d(previous, width, kernel, 2, 1), nn.LeakyReLU(0.2)]
        previous = width
    if minibatch_std:
        layers.append(MinibatchStdDev(minibatch_std))
        previous += 1
    return layers + [nn.Conv2d(previous, 1, last_kernel, 1, 0)]


class Discriminator(nn.Module):
    def __init__(self, num_classes: int = 10, channels=None, image_channels: int = 1, image_size: int = 28,
                 minibatch_std: int = 0):
        super().__init__()
        check_image_shape(image_size, image_channels)
        channels = DEFAULT_DISCRIMINATOR_CHANNELS[image_size] if channels is None else channels
        allowed = discriminator_widths_allowed(image_size)
        if len(channels) not in allowed or min(channels) < 1:
            raise ValueError(f"discriminator channels must be {allowed[0]} or {allowed[1]} positive widths for "
                             f"{image_size}x{image_size} images, got {list(channels)}")
        if minibatch_std < 0:
            raise ValueError(f"minibatch_std must be 0 (off) or a group size, got {minibatch_std}")
        self.num_classes, self.image_channels, self.image_size = num_classes, image_channels, image_size
        self.channels, self.minibatch_std = tuple(int(c) for c in channels), int(minibatch_std)
        last_kernel = discriminator_last_side(image_size, len(self.channels))
        self.net = nn.Sequential(*discriminator_layers(image_channels + num_classes, self.channels,
                                                       num_discriminator_downsamples(image_size), last_kernel,
                                                       self.minibatch_std))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                nn.init.zeros_(module.bias)

    def model_args(self) -> dict:
        """The keyword arguments that rebuild this discriminator: `Discriminator(**D.model_args())`."""
        return {"num_classes": self.num_classes, "channels": list(self.channels),
                "image_channels": self.image_channels, "image_size": self.image_size,
                "minibatch_std": self.minibatch_std}

    def without_minibatch_std(self) -> "Discriminator":
        """A new discriminator without the minibatch std layer (what DP-SGD may train): the same weights, the
        logit conv without the input slice of the std channel (the last one); a plain copy when there is none."""
        last = self.net[-1]
        plain = Discriminator(**{**self.model_args(), "minibatch_std": 0}).to(last.weight)
        plain.net[:-1].load_state_dict(self.net[:-2 if self.minibatch_std else -1].state_dict())  # strided convs
        plain.net[-1].load_state_dict({"weight": last.weight[:, :plain.net[-1].in_channels], "bias": last.bias})
        return plain.train(self.training)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One real-vs-fake logit per image."""
        planes = F.one_hot(labels, self.num_classes).to(images.dtype)[:, :, None, None]
        planes = planes.expand(-1, -1, images.shape[2], images.shape[3])
        return self.net(torch.cat([images, planes], dim=1)).flatten()
