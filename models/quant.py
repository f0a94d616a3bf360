"""Fake-quantised conv layers with a straight-through estimator (docs/DESIGN.md, "GAN Slimming and
compression").

Weights: symmetric, per output channel, scale = max|W| / (2^(bits-1) - 1). The scale lives in the buffer
`weight_scale`: recomputed from the weights on every training forward (as in the GAN Slimming release) and by
`refresh_scale()`; used as stored in eval mode. Because the scale is part of the state, a compact model that
drops dead input channels keeps the student's exact integer grid, even when the largest weight of an output
channel sat in a dead input channel.

Activations: uniform per layer on the fixed range [0, ACT_RANGE], 2^bits levels.
bits == 32 means float: every function here is then the identity.
"""
import torch
import torch.nn.functional as F
from torch import nn

ACT_RANGE = 4.0  # GAN Slimming clamps activations to [0, 4] before quantising


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def weight_scale(weight: torch.Tensor, bits: int, out_dim: int) -> torch.Tensor:
    """Per-output-channel scale max|W| / qmax (a 1-D tensor); zero channels get scale 1 so they stay zero."""
    reduce_dims = [d for d in range(weight.dim()) if d != out_dim]
    max_abs = weight.detach().abs().amax(dim=reduce_dims)
    return torch.where(max_abs > 0, max_abs / weight_qmax(bits), torch.ones_like(max_abs))


def _broadcast(scale: torch.Tensor, weight: torch.Tensor, out_dim: int) -> torch.Tensor:
    shape = [1] * weight.dim()
    shape[out_dim] = -1
    return scale.view(shape)


def weight_to_int(weight: torch.Tensor, scale: torch.Tensor, bits: int, out_dim: int) -> torch.Tensor:
    """The integer weights (as an integer-valued float tensor) that `quantize_weight` multiplies by the scale."""
    qmax = weight_qmax(bits)
    return torch.clamp(torch.round(weight / _broadcast(scale, weight, out_dim)), -qmax, qmax)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int, out_dim: int) -> torch.Tensor:
    """Fake-quantise `weight` on the per-channel grid `scale`, straight-through gradient."""
    if bits >= 32:
        return weight
    qmax = weight_qmax(bits)
    scaled = weight / _broadcast(scale, weight, out_dim)
    rounded = torch.round(scaled)
    # straight-through wherever the rounded value is on the grid (as torch.fake_quantize does), not through a
    # clamp: a clamp's gradient is 0 at its bounds, which would freeze every weight that rounds to +-qmax
    q = torch.where(rounded.abs() <= qmax, _round_ste(scaled), rounded.clamp(-qmax, qmax))
    return q * _broadcast(scale, weight, out_dim)


def quantize_activation(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Clamp to [0, ACT_RANGE] and round to 2^bits uniform levels, straight-through gradient."""
    if bits >= 32:
        return x
    step = ACT_RANGE / (2 ** bits - 1)
    return _round_ste(torch.clamp(x, 0.0, ACT_RANGE) / step) * step


class _QuantMixin:
    """Shared state of the quantised conv layers; `out_dim` is where the output channels sit in the weight."""
    out_dim: int

    def _init_quant(self, bits: int):
        self.bits = int(bits)
        self.register_buffer("weight_scale", torch.ones(self.weight.shape[self.out_dim]))
        self.refresh_scale()

    @torch.no_grad()
    def refresh_scale(self):
        if self.bits < 32:
            self.weight_scale.copy_(weight_scale(self.weight, self.bits, self.out_dim))

    def quantized_weight(self) -> torch.Tensor:
        if self.bits >= 32:
            return self.weight
        scale = self.weight_scale
        if self.training:
            # the graph keeps a fresh tensor, not the buffer: refreshing the buffer in place on a second forward
            # must not invalidate the first forward's pending backward
            scale = weight_scale(self.weight, self.bits, self.out_dim)
            self.weight_scale.copy_(scale)
        return quantize_weight(self.weight, scale, self.bits, self.out_dim)

    def extra_repr(self):
        return super().extra_repr() + f", bits={self.bits}"


class QuantConv2d(_QuantMixin, nn.Conv2d):
    out_dim = 0

    def __init__(self, *args, bits: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(bits)

    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QuantConvTranspose2d(_QuantMixin, nn.ConvTranspose2d):
    out_dim = 1  # ConvTranspose2d weights are (in, out, kh, kw)

    def __init__(self, *args, bits: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(bits)

    def forward(self, x):
        return F.conv_transpose2d(x, self.quantized_weight(), self.bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)
