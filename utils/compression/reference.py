"""The eager integer reference of `generator.onnx`: the compact generator's integer program
(`utils.compression.runtime.lower`) computed in torch with the runtime's own arithmetic, so that its images equal the
artifact's bit for bit (docs/DESIGN.md, "What ships").

Every step is one that two IEEE implementations compute alike: integer sums (here in float64, exact: every product
and partial sum is an integer far below 2^53), conversions and single float operations (each correctly rounded),
round half to even and saturation. In order, as ONNX Runtime's kernels do them:

    block0     limbs: x = z ++ embed[label] (float32), u = round(clip(x * 2^F)) + offset, limb k = (u >> shift_k)
               & mask; sum_k 2^shift_k ((limb_k - limb_zero) @ q) (integers); or float64 x @ q; then * scale
               (per grid unit for the limbs), + bias (float64), float32, QuantizeLinear (x / quant_scale, round
               half to even, + zero, saturate to uint8), clip to 2^bits - 1
    block1..N  QLinearConv: acc = sum (x - input_zero)(w - weight_zero) + bias (int32), float32(acc) * scale
               (float32), round half to even, + output_zero, saturate to uint8; clip; DepthToSpace; crop
    to_image   ConvInteger: acc = sum (x - input_zero)(w - weight_zero); float32(acc) * scale + bias (float32);
               tanh as runtime.TANH's single float32 operations

block0's limb sums are exact integers (in float64: every partial sum is an integer below 2^53). Its float64
sums (the fallback, runtime.BLOCK0_SUMS) are exact whenever the products' binary exponents span less than 53 bits
(every input at least 2^-20 in magnitude, or 0, for sums below 2^11); otherwise both sides round a sum whose error is
far below float32's resolution. Everything else is exact by construction.
"""
import numpy as np
import torch
import torch.nn.functional as F

from utils.compression.runtime import TANH_CLAMP, TANH_P, TANH_Q, ImageLayer, IntegerProgram, LatentLayer, \
    SubpixelLayer


def _saturate(x: torch.Tensor, zero: int, top: int) -> torch.Tensor:
    """round half to even (torch.round), + zero point, saturate to uint8, then clip to `top` (2^bits - 1)."""
    return (torch.round(x) + zero).clamp(0, 255).clamp(max=top)


def limb_sums(p: LatentLayer, x: torch.Tensor) -> torch.Tensor:
    """sum_i u_i q_i of the float32 input's grid integers u, limb by limb as the graph computes it (float64)."""
    grid = torch.round((x * 2.0 ** p.fraction_bits).clamp(-p.limit, p.limit)) + p.limb_offset  # float32, exact
    unsigned, ints = grid.to(torch.int64), torch.from_numpy(p.ints).double()
    total = torch.zeros(len(x), ints.shape[1], dtype=torch.float64)
    for shift in p.limb_shifts:
        limb = (unsigned >> shift) & p.limb_mask
        total += ((limb - p.limb_zero).double() @ ints) * 2.0 ** shift
    return total


def latent(p: LatentLayer, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = torch.cat([z.float(), torch.from_numpy(p.embed)[labels]], dim=1)
    y = limb_sums(p, x) if p.sums == "limbs" else x.double() @ torch.from_numpy(p.ints).double()
    y = y.view(len(z), len(p.scale), p.side, p.side) * torch.from_numpy(p.sum_scale).view(1, -1, 1, 1)
    y = (y + torch.from_numpy(p.bias).view(1, -1, 1, 1)).float()
    return _saturate(y / torch.tensor(p.quant_scale, dtype=torch.float32), p.zero, p.top)


def _integer_conv(x: torch.Tensor, input_zero: int, weights: np.ndarray, weight_zero: int, padding: int):
    """sum (x - input_zero)(w - weight_zero), exact (integers in float64); the padding is the input zero point."""
    return F.conv2d(x.double() - input_zero, torch.from_numpy(weights - weight_zero).double(), padding=padding)


def subpixel(p: SubpixelLayer, x: torch.Tensor) -> torch.Tensor:
    acc = _integer_conv(x, p.input_zero, p.weights, p.weight_zero, 1)
    acc = (acc + torch.from_numpy(p.bias.astype(np.float64)).view(1, -1, 1, 1)).float()
    y = _saturate(acc * torch.from_numpy(p.scale).view(1, -1, 1, 1), p.output_zero, p.top)
    n, c4, h, w = y.shape  # DepthToSpace (DCR), then the one-pixel crop
    y = y.view(n, 2, 2, c4 // 4, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c4 // 4, 2 * h, 2 * w)
    return y[:, :, 1:-1, 1:-1]


def tanh(x: torch.Tensor) -> torch.Tensor:
    """runtime.TANH's float32 operations, one at a time, in the graph's order."""
    def const(value):
        return torch.tensor(value, dtype=torch.float32)
    x = x.clamp(-TANH_CLAMP, TANH_CLAMP)
    x2 = x * x

    def horner(coefficients):
        y = x2 * const(coefficients[0])
        for i, c in enumerate(coefficients[1:], 1):
            y = y + const(c)
            if i < len(coefficients) - 1:
                y = y * x2
        return y
    return (horner(TANH_P) * x) / horner(TANH_Q)


def image(p: ImageLayer, x: torch.Tensor) -> torch.Tensor:
    acc = _integer_conv(x, p.input_zero, p.weights, p.weight_zero, p.padding).float()
    y = acc * torch.from_numpy(p.scale).view(1, -1, 1, 1)
    return tanh(y + torch.from_numpy(p.bias).view(1, -1, 1, 1))


@torch.no_grad()
def reference_images(program: IntegerProgram, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The images generator.onnx computes for (z, labels), float32 on the CPU."""
    x = latent(program.latent, z.cpu(), labels.cpu())
    for layer in program.blocks.values():
        x = subpixel(layer, x)
    return image(program.image, x)
