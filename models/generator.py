"""The class-conditional DCGAN generator: teacher, student and compact model in one class, for 28, 32 or 64 pixels.

    z (nz) ++ embed(label) -> [block0] 7x7 -> [block1] 14x14 -> [block2] 28x28 -> to_image (3x3 conv) -> tanh
    (32: 4-8-16-32 in four blocks; 64: 4-8-16-32-64 in five; see models/shapes.py)

Each block is a (quantised) transposed conv, a `PrunableBatchNorm2d` whose gamma is the GAN Slimming channel
scale, ReLU and activation quantisation. The teacher is `bits=32` (float); the student is the same topology with
`bits=QUANT_BITS`; the compact generator is the same class with fewer channels. `channels` gives the widths of
the blocks (one per block), `image_size` and `image_channels` the output's shape, so any generator rebuilds from
`Generator(**model_args)`. The 28x28 layout is the original one: same parameter names, shapes and initialisation.
"""
import torch
from torch import nn

from models.quant import QuantConv2d, QuantConvTranspose2d, quantize_activation
from models.shapes import DEFAULT_GENERATOR_CHANNELS, START_SIDE, check_image_shape, prunable_layers

PRUNABLE_LAYERS = prunable_layers(28)  # the 28x28 generator's; a generator's own are `g.prunable_layers`


class PrunableBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose channels can die: `alive` marks channels whose gamma and beta are not pinned at 0."""

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.register_buffer("alive", torch.ones(num_features, dtype=torch.bool))

    @torch.no_grad()
    def enforce_dead(self):
        """Pin gamma and beta of dead channels to exactly 0, so the channel outputs exactly 0."""
        self.weight.masked_fill_(~self.alive, 0.0)
        self.bias.masked_fill_(~self.alive, 0.0)


class GeneratorBlock(nn.Module):
    def __init__(self, in_ch, out_ch, kernel, stride, padding, bits):
        super().__init__()
        self.bits = bits
        self.conv = QuantConvTranspose2d(in_ch, out_ch, kernel, stride, padding, bias=False, bits=bits)
        self.norm = PrunableBatchNorm2d(out_ch)
        self.act = nn.ReLU()

    def forward(self, x):
        return quantize_activation(self.act(self.norm(self.conv(x))), self.bits)


class Generator(nn.Module):
    def __init__(self, nz: int = 100, num_classes: int = 10, channels=None, bits: int = 32,
                 image_channels: int = 1, embed_dim: int = None, image_size: int = 28):
        super().__init__()
        check_image_shape(image_size, image_channels)
        self.prunable_layers = prunable_layers(image_size)
        channels = DEFAULT_GENERATOR_CHANNELS[image_size] if channels is None else channels
        if len(channels) != len(self.prunable_layers) or min(channels) < 1:
            raise ValueError(f"channels must be {len(self.prunable_layers)} positive widths for {image_size}x"
                             f"{image_size} images, got {list(channels)}")
        self.nz, self.num_classes, self.bits = nz, num_classes, int(bits)
        self.channels = tuple(int(c) for c in channels)
        self.image_channels, self.image_size = image_channels, image_size
        self.embed_dim = embed_dim or num_classes
        self.embed = nn.Embedding(num_classes, self.embed_dim)
        widths = (nz + self.embed_dim,) + self.channels
        for i, name in enumerate(self.prunable_layers):
            # the first block turns the 1x1 input into the start square, every later one doubles the side
            shape = (START_SIDE[image_size], 1, 0) if i == 0 else (4, 2, 1)
            setattr(self, name, GeneratorBlock(widths[i], widths[i + 1], *shape, self.bits))
        self.to_image = QuantConv2d(self.channels[-1], image_channels, 3, 1, 1, bits=self.bits)
        # When set, BatchNorm keeps using its running statistics in training mode: it is then a fixed per-channel
        # affine map, so shrinking a channel's gamma really shrinks its output instead of being undone by the next
        # layer's batch normalisation (GAN Slimming from a pretrained teacher), and train and eval mode agree.
        self.frozen_norm_stats = False
        self.reset_parameters()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_norm_stats:
            for block in self.blocks():
                block.norm.eval()
        return self

    @torch.no_grad()
    def reset_parameters(self):
        """DCGAN initialisation: conv weights N(0, 0.02), BatchNorm gamma N(1, 0.02)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
                module.refresh_scale()
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def model_args(self) -> dict:
        """Everything needed to rebuild this network: `Generator(**g.model_args())`."""
        return {"nz": self.nz, "num_classes": self.num_classes, "channels": list(self.channels),
                "bits": self.bits, "image_channels": self.image_channels, "embed_dim": self.embed_dim,
                "image_size": self.image_size}

    def blocks(self):
        return [getattr(self, name) for name in self.prunable_layers]

    def active_channels(self) -> list:
        """Live channels per prunable layer (a channel dies when its gamma reaches exactly 0)."""
        return [int(block.norm.alive.sum()) for block in self.blocks()]

    def refresh_quant_scales(self):
        """Recompute every layer's weight scale from its current weights (eval mode uses the stored scales)."""
        for module in self.modules():
            if hasattr(module, "refresh_scale"):
                module.refresh_scale()

    def sample_inputs(self, n: int, generator: torch.Generator = None, device="cpu", labels=None):
        """n latent vectors and labels (balanced over classes unless given)."""
        z = torch.randn(n, self.nz, generator=generator).to(device)
        if labels is None:
            labels = torch.arange(n) % self.num_classes
        return z, labels.to(device)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, self.embed(labels)], dim=1)[:, :, None, None]
        for block in self.blocks():
            x = block(x)
        return torch.tanh(self.to_image(x))
