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


# ---------------------------------------------------------------- the program against the model, layer by layer

FLOAT_SLACK = 1e-4  # activation steps: float32 error of the model's own conv sums, far above its measured 1e-6
IMAGE_TOLERANCE = 1e-4  # |program - model| of a pixel of to_image + tanh on the same input (measured: 4e-7)


def _rounding_bounds(program: IntegerProgram) -> dict:
    """How far, in activation steps, each layer's pre-activation may lie from the model's on the same input, per
    output channel: block0 moves its inputs onto the limbs' grid (`grid_bound`); a sub-pixel layer rounds its folded
    bias to its accumulator's grid (half a unit, `scale` steps per unit); both plus FLOAT_SLACK."""
    from utils.compression.runtime import grid_bound
    bounds = {"block0": np.full(len(program.latent.scale), grid_bound(program.latent))}
    for name, layer in program.blocks.items():
        bounds[name] = 0.5 * layer.scale[:len(layer.scale) // 4].astype(np.float64)  # the 4 phases share a scale
    return {name: torch.from_numpy(bound + FLOAT_SLACK).view(1, -1, 1, 1) for name, bound in bounds.items()}


def _layer_verdict(program_out: torch.Tensor, pre: torch.Tensor, bound: torch.Tensor, top: int) -> dict:
    """Every integer activation must lie within half a step plus `bound` of the model's pre-activation `pre` (in
    steps, clamped to [0, top]): the rounded value, or its neighbour where `pre` is within `bound` of a half step."""
    pre = pre.double().clamp(0, top)
    distance = (program_out.double() - pre).abs()
    return {"violations": int((distance > 0.5 + bound).sum()),
            "flips": int((program_out.double() != torch.round(pre)).sum()), "activations": program_out.numel(),
            "max_distance": float(distance.max()), "max_bound": float(0.5 + bound.max())}


@torch.no_grad()
def layer_check(program: IntegerProgram, generator, z: torch.Tensor, labels: torch.Tensor) -> dict:
    """The program against the eval-mode compact `generator` (on the CPU), each layer on the program's own input, so
    that a rounding flip in one layer does not spread into the next: per integer layer, `_layer_verdict`
    (violations must be 0); for to_image and tanh, the largest pixel difference (at most IMAGE_TOLERANCE). A wrong
    scale, bias, zero point or channel order of the program moves activations by more than its rounding allows; a
    flip at a rounding boundary does not (docs/DESIGN.md, "What ships")."""
    from utils.compression.runtime import activation_step
    step, bounds, layers = activation_step(program.bits), _rounding_bounds(program), {}
    z, labels = z.cpu(), labels.cpu()
    x = latent(program.latent, z, labels)
    block0 = generator.block0
    pre = block0.norm(block0.conv(torch.cat([z, generator.embed(labels)], 1)[:, :, None, None])) / step
    layers["block0"] = _layer_verdict(x, pre, bounds["block0"], program.latent.top)
    for name, layer in program.blocks.items():
        block = getattr(generator, name)
        pre = block.norm(block.conv(x * step)) / step
        x = subpixel(layer, x)
        layers[name] = _layer_verdict(x, pre, bounds[name], layer.top)
    image_diff = float((image(program.image, x) - torch.tanh(generator.to_image(x * step))).abs().max())
    ok = all(v["violations"] == 0 for v in layers.values()) and image_diff <= IMAGE_TOLERANCE
    return {"ok": ok, "layers": layers, "image_max_abs_diff": image_diff, "image_tolerance": IMAGE_TOLERANCE}


def merge_layer_checks(checks: list) -> dict:
    """One `layer_check` verdict from those of several batches."""
    layers = {}
    for name in checks[0]["layers"]:
        parts = [check["layers"][name] for check in checks]
        layers[name] = {key: sum(part[key] for part in parts) for key in ("violations", "flips", "activations")}
        layers[name].update(max_distance=max(part["max_distance"] for part in parts),
                            max_bound=max(part["max_bound"] for part in parts))
    image_diff = max(check["image_max_abs_diff"] for check in checks)
    return {"ok": all(check["ok"] for check in checks), "layers": layers, "image_max_abs_diff": image_diff,
            "image_tolerance": IMAGE_TOLERANCE}
