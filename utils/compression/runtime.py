"""The on-device artifact: the compact generator as an ONNX model that ONNX Runtime runs with integer weights inside.

`generator.onnx` needs ONNX Runtime (and numpy) and nothing else: `utils/compression/ort_runner.py` runs it without
torch. Why ONNX Runtime and not ExecuTorch: see benchmarks/results/runtime_choice.md.

The graph is written from the compact `Generator`'s integer program (`lower`: no exporter, no fake-quantisation
arithmetic), in a form whose heavy layers run on ONNX Runtime's integer kernels:

    z, labels -> Gather(embedding) ++ z -> block0 -> block1 ... blockN -> to_image -> tanh
    (N = 2 at 28x28, 3 at 32, 4 at 64)

* Every BatchNorm is folded into its conv's per-output-channel weight scale and a bias: BN(conv(x, q * s)) =
  conv(x, q) * (s * a) + b with a = gamma / sqrt(var + eps), b = beta - mean * a. The integers q stay the
  student's (their sign flips where a < 0, so that every scale is positive).
* An activation (ReLU, clamp to [0, ACT_RANGE], 2^bits - 1 uniform steps) IS a uint8 tensor of integers 0 ..
  2^bits - 1 (zero point 0): QuantizeLinear / QLinearConv saturate at 0 and 255, which is the ReLU and, at 8 bits,
  the clamp (below 8 bits a Clip to 2^bits - 1 follows). The graph works in units of one activation step, so every
  requantisation is `round_half_even(float32(acc) * scale)` with the layer's own float32 `scale`.
* block1 to blockN (4x4 transposed convs, stride 2; ONNX Runtime's CPU provider has no integer transposed conv)
  are rewritten exactly as sub-pixel convolutions: one QLinearConv with 2x2 kernels and 4x the output channels
  (each of the 16 taps of the transposed kernel lands in exactly one of 4 phases), DepthToSpace, and a one-pixel
  crop. Integer products, int32 accumulation, requantised straight to the next activation; input and output
  scales are 1, so the runtime's multiplier x_scale * w_scale / y_scale is the layer's scale exactly. The weights
  run as uint8 (q + 128, zero point 128): with int8 weights, ONNX Runtime's x86 kernels without VNNI add pairs of
  uint8 x int8 products in saturating int16 (255 x 127 x 2 > 32767), which moved activations of full-range
  weights. The folded bias is an int32 on the accumulator's grid (one unit = the multiplier); to make that grid
  finer, each channel's weights are multiplied by K = 127 // max |q| (`weight_multipliers`; >= 18 at 4 bits) when
  the session loads, and its scale divided by K.
* block0 (the latent vector z ++ embed[label] is a float input) sums integers, exactly (`BLOCK0_SUMS` = "limbs",
  `_limb_sums`): the input is put on a fixed-point grid, u = round_half_even(clip(x * 2^FRACTION_BITS, +-LIMIT))
  (float32 operations, all exact), split into three 7-bit limbs of u + offset (uint8, BitShift and BitwiseAnd),
  each limb times the int8 weights in one MatMulInteger (int32 sums, every limb's zero point LIMB_ZERO), and the
  limbs' sums combined as sum_k 2^shift_k acc_k in int64: exactly sum_i u_i q_i, whatever order the kernel adds
  in. Then `* scale * 2^-FRACTION_BITS + bias` in float64, float32, QuantizeLinear. The grid moves an input by at
  most 2^-(FRACTION_BITS + 1) (and clips |x| above LIMIT / 2^FRACTION_BITS = 15.87, which a normal latent does
  not reach): `grid_bound` says how far that can move a block0 output, in activation steps (measured: far below
  one; benchmarks/results/runtime_choice.md). The other way (`BLOCK0_SUMS` = "float64", kept as the fallback
  and for an embedding outside the grid): products of float32 inputs and integer weights summed in float64, exact
  in practice (utils/compression/reference.py says when), but float64 MatMul packs its weights on every call
  (twice the latency at batch 1). Which one a model got is in its metadata and compression.json. to_image sums integers
  (ConvInteger, uint8 weights q + 128), then scales, adds its bias and applies tanh in float32 single operations:
  tanh as the rational function TANH of Clip, Mul, Add and Div nodes, because the runtime's Tanh kernel is an
  approximation of its own that an eager model cannot reproduce bit for bit.

Verification (`verify_runtime`), two-fold on 1,024 seeded inputs: (1) exact: the artifact's images equal, bit for
bit, those of the eager integer reference of the same program (utils/compression/reference.py: integer sums, the
same requantisation and rounding). Any difference between what the graph is meant to compute and what the runtime
computes (a wrong zero point or shift, a kernel that saturates or rounds otherwise) fails it. (2) The second
guard, against an error of the program itself, which graph and reference would share: the program computes the
compact model's layers (`reference.layer_check`), each layer on the program's own input so that a rounding flip
does not spread: every integer activation lies within half a step, plus the layer's own rounding bound, of the
model's pre-activation (block0: `grid_bound`; a sub-pixel layer: half a unit of its int32 bias grid), and to_image
+ tanh within IMAGE_TOLERANCE of the model's. A one-unit bias, a doubled shift or a moved zero point fails it
(tests/test_reference.py). Through the whole chain the images are NOT required to match the model's: an activation
within the bound of a half step can land on the other neighbour, and in a narrow 4-bit layer one such flip moves
much of the next layers' output. Measured on the 4-bit, 24/21/45-channel sweep point (rho 0.15, params penalty)
that the earlier chain-wise guard refused: 6,417 of 4.2M block1 activations flipped (all within the bound), image
mean abs difference 0.0023 and 1.15 % of the pixels above 0.05 through the chain, 3.6e-7 for to_image on the
program's own input. The chain's differences (`judge`: mean, largest, share above TOLERANCE) are still measured
and reported in compression.json; at 32 bits (the float teacher baseline) `judge` is the check.

Weights are stored as INT8 initializers, or INT4 (ONNX's packed type, two per byte) for <= 4 bits, plus float
scales and biases. 32-bit (float) generators (the teacher: the baseline of the in-runtime ratios,
`teacher_baseline`) are written as a plain float graph, checked against the eager model to BASELINE_TOLERANCE.
"""
import copy
import dataclasses
import math
import os
import shutil
import tempfile

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from models import Generator
from models.quant import ACT_RANGE, weight_to_int
from utils.compression.ort_runner import generate, load_session, measure_speed

RUNTIME_NAME = "generator.onnx"
RUNNER_NAME = "ort_runner.py"
FORMAT = "device-gan-generator-onnx"
OPSET = 21  # INT4 initializers and Cast from INT4
TOLERANCE = 0.05  # |runtime - model| of one pixel, images in [-1, 1]: reported below 32 bits, checked at 32
PIXEL_SHARE = 0.01  # share of the pixels allowed above TOLERANCE (rounding-boundary flips; measured up to 0.12 %)
MEAN_TOLERANCE = 1e-3  # mean |runtime - compact| per pixel
FLOAT_LAYERS = ("block0", "to_image")  # not QLinearConv: integer sums, then float64 / float32 (module docstring)
WEIGHT_OFFSET = 128  # the integer kernels read the weights as uint8 K * q + 128 (see the module docstring)
BLOCK0_SUMS = "limbs"  # how block0 sums: "limbs" (exact integers, MatMulInteger) or "float64" (module docstring)
FRACTION_BITS = 16  # block0's input grid: multiples of 2^-16
LIMB_SHIFTS = (0, 7, 14)  # three 7-bit limbs (mask 127): u + LIMB_OFFSET holds 21 bits
LIMB_MASK = 127  # 7-bit limbs: a pair of uint8 x int8 products stays within int16 (2 x 127 x 127 = 32,258)
LIMB_ZERO = 64  # MatMulInteger's zero point of every limb: sum_k 2^shift_k (limb_k - 64) = u
LIMB_OFFSET = LIMB_ZERO * sum(2 ** shift for shift in LIMB_SHIFTS)  # 1,056,832: makes every limb unsigned
LIMIT = 2 ** 21 - 1 - LIMB_OFFSET  # |u| <= 1,040,319, so that 0 <= u + LIMB_OFFSET < 2^21
# tanh(x) ~ x * P(x^2) / Q(x^2) for x clamped to [-TANH_CLAMP, TANH_CLAMP]: the rational approximation of Eigen's
# and MLAS's float tanh (coefficients highest power first), written as single float32 operations so that every
# IEEE implementation computes it bit for bit; within 4e-7 of tanh (tests/test_reference.py)
TANH_CLAMP = 9.0
TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
          1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)


def supports(bits: int) -> bool:
    return bits <= 8 or bits >= 32


@dataclasses.dataclass
class FoldedConv:
    """One conv with its BatchNorm folded in: output = conv(x, ints) * scale + bias (per output channel)."""
    ints: np.ndarray  # integer-valued (or float, for a float model), the torch weight layout
    scale: np.ndarray  # (out,) float64, > 0
    bias: np.ndarray  # (out,) float64
    out_dim: int


def _norm_affine(norm) -> tuple:
    """(a, b) with norm(y) = a * y + b per channel, eval mode."""
    var, mean = norm.running_var.double(), norm.running_mean.double()
    a = norm.weight.detach().double() / torch.sqrt(var + norm.eps)
    return a.numpy(), (norm.bias.detach().double() - mean * a).numpy()


def fold_conv(conv, norm=None) -> FoldedConv:
    """The conv's integers and per-channel scale (its stored `weight_scale`, never recomputed) with `norm` folded."""
    weight = conv.weight.detach().cpu()
    out = weight.shape[conv.out_dim]
    if conv.bits < 32:
        ints = weight_to_int(weight, conv.weight_scale.cpu(), conv.bits, conv.out_dim).numpy()
        scale = conv.weight_scale.detach().cpu().double().numpy()
    else:
        ints, scale = weight.numpy(), np.ones(out)
    bias = conv.bias.detach().cpu().double().numpy() if conv.bias is not None else np.zeros(out)
    if norm is not None:
        a, b = _norm_affine(norm)
        scale, bias = scale * a, bias * a + b
    sign = np.where(scale < 0, -1.0, 1.0)
    shape = [1] * ints.ndim
    shape[conv.out_dim] = -1
    ints = ints * sign.reshape(shape)
    dead = scale == 0  # the channel is the constant `bias`
    ints = np.where(dead.reshape(shape), 0.0, ints)
    return FoldedConv(ints, np.where(dead, 1.0, np.abs(scale)), bias, conv.out_dim)


def subpixel_kernel(weight: np.ndarray) -> np.ndarray:
    """A (in, out, 4, 4) stride-2 padding-1 transposed-conv weight -> the (4 * out, in, 2, 2) conv weight whose
    output, after DepthToSpace(2, DCR) and a one-pixel crop, is the transposed conv's output. Phase (r, c) (channel
    block 2r + c) at tap (dy, dx) holds the transposed kernel's tap (2 + r - 2dy, 2 + c - 2dx)."""
    phases = []
    for r in (0, 1):
        for c in (0, 1):
            taps = weight[:, :, [2 + r, r], :][:, :, :, [2 + c, c]]
            phases.append(taps.transpose(1, 0, 2, 3))
    return np.concatenate(phases, axis=0)


# ---------------------------------------------------------------- the integer program

def weight_multipliers(ints: np.ndarray) -> np.ndarray:
    """K per output channel of a (out, ...) integer kernel: the integers are multiplied by K (still within int8)
    and their scale divided by K, which leaves the weights unchanged but makes the int32 bias's grid (one unit =
    activation step x weight scale) K times finer. K = 127 // max |q| of the channel: 1 for a full 8-bit channel,
    >= 18 at 4 bits, and large where the student's scale came from a weight of a removed input channel."""
    max_abs = np.abs(ints).reshape(len(ints), -1).max(axis=1)
    return 127 // np.maximum(max_abs, 1).astype(np.int64)


@dataclasses.dataclass
class LatentLayer:
    """block0: x = z ++ embed[label] (float32) times the integer weights, summed either as the integers of x's
    fixed-point grid, limb by limb (sums "limbs": see `_limb_sums`), or in float64 (sums "float64"); then
    `sum * sum_scale + bias` (float64, in activation steps), cast to float32, QuantizeLinear(quant_scale, zero)."""
    embed: np.ndarray  # (classes, embed_dim) float32
    ints: np.ndarray  # (nz + embed_dim, out * side * side) integer weights
    scale: np.ndarray  # (out,) float64, per unit of x
    bias: np.ndarray  # (out,) float64
    side: int
    top: int  # the largest activation, 2^bits - 1
    quant_scale: float = 1.0
    zero: int = 0
    sums: str = BLOCK0_SUMS
    fraction_bits: int = FRACTION_BITS  # the grid: u = round(clip(x * 2^fraction_bits, -limit, limit))
    limit: int = LIMIT
    limb_offset: int = LIMB_OFFSET  # added to u before the split
    limb_shifts: tuple = LIMB_SHIFTS  # limb k = ((u + limb_offset) >> shift_k) & limb_mask, weighed 2^shift_k
    limb_mask: int = LIMB_MASK
    limb_zero: int = LIMB_ZERO  # MatMulInteger's zero point of the limbs

    @property
    def sum_scale(self) -> np.ndarray:
        """What the sums are multiplied by: `scale`, per grid unit (2^-fraction_bits of x) for the limbs."""
        return self.scale * 2.0 ** -self.fraction_bits if self.sums == "limbs" else self.scale


def grid_bound(p: LatentLayer) -> float:
    """The most the input grid can move a block0 output before requantisation, in activation steps: each input
    moves by at most half a grid unit, 2^-(fraction_bits + 1), so output c by at most that times sum_i |q_ic| *
    scale_c (inputs within the clip; 0 for float64 sums)."""
    if p.sums != "limbs":
        return 0.0
    weight_sums = np.abs(p.ints).sum(axis=0).reshape(len(p.scale), -1).max(axis=1)
    return float((weight_sums * p.scale).max() * 2.0 ** -(p.fraction_bits + 1))


@dataclasses.dataclass
class SubpixelLayer:
    """One upsampling block as a sub-pixel QLinearConv: acc = sum (x - input_zero)(weights - weight_zero) + bias in
    integers, next activation = saturate(round_half_even(float32(acc) * scale) + output_zero), then clipped to top,
    DepthToSpace and cropped."""
    ints: np.ndarray  # (4 * out, in, 2, 2) the stored integer weights q
    multipliers: np.ndarray  # (4 * out,) K (`weight_multipliers`)
    bias: np.ndarray  # (4 * out,) int32, in accumulator units
    scale: np.ndarray  # (4 * out,) float32 requantisation multiplier
    top: int
    weight_zero: int = WEIGHT_OFFSET
    input_zero: int = 0
    output_zero: int = 0

    @property
    def weights(self) -> np.ndarray:
        """The uint8 weights QLinearConv reads: K * q + WEIGHT_OFFSET."""
        return self.ints.astype(np.int64) * self.multipliers.reshape(-1, 1, 1, 1) + WEIGHT_OFFSET


@dataclasses.dataclass
class ImageLayer:
    """to_image: acc = sum (x - input_zero)(weights - weight_zero) in integers (ConvInteger), then float32(acc) *
    scale + bias in float32 and `TANH` in float32 arithmetic."""
    ints: np.ndarray  # (out, in, k, k)
    scale: np.ndarray  # (out,) float32
    bias: np.ndarray  # (out,) float32
    padding: int
    weight_zero: int = WEIGHT_OFFSET
    input_zero: int = 0

    @property
    def weights(self) -> np.ndarray:
        return self.ints.astype(np.int64) + WEIGHT_OFFSET


@dataclasses.dataclass
class IntegerProgram:
    """What generator.onnx computes, as numbers: the graph is written from it (`build_onnx`) and the eager integer
    reference (utils/compression/reference.py) computes from it, so the two share every constant."""
    model_args: dict
    latent: LatentLayer
    blocks: dict  # name -> SubpixelLayer, in order
    image: ImageLayer

    @property
    def bits(self) -> int:
        return self.model_args["bits"]


def activation_step(bits: int) -> float:
    return ACT_RANGE / (2 ** bits - 1)


def latent_sums(generator: Generator, sums: str = None) -> str:
    """`sums` (default BLOCK0_SUMS), but "float64" where an embedding value lies outside the limbs' grid."""
    sums = sums or BLOCK0_SUMS
    if sums not in ("limbs", "float64"):
        raise ValueError(f"block0 sums are 'limbs' or 'float64', not {sums!r}")
    embed = generator.embed.weight.detach().abs().max().item()
    return "float64" if sums == "limbs" and not embed * 2 ** FRACTION_BITS <= LIMIT else sums


def _latent_layer(generator: Generator, top: int, step: float, sums: str) -> LatentLayer:
    folded = fold_conv(generator.block0.conv, generator.block0.norm)
    ints = folded.ints.reshape(folded.ints.shape[0], -1)
    # limbs: every MatMulInteger sum of (limb - LIMB_ZERO) * q is at most inputs x 64 x 127 in magnitude, and the
    # kernel's own sum of limb * q at most inputs x 127 x 127 (int32 for up to 133,000 inputs); the int64
    # combination sum_i u_i q_i at most inputs x 2^20 x 127 < 2^53 (exact in float64 after it)
    if len(ints) * 127 * 127 >= 2 ** 31:
        raise ValueError(f"block0 has {len(ints)} inputs: its limb sums could overflow int32")
    return LatentLayer(embed=generator.embed.weight.detach().cpu().numpy().astype(np.float32), ints=ints,
                       scale=folded.scale / step, bias=folded.bias / step, side=folded.ints.shape[-1], top=top,
                       sums=latent_sums(generator, sums))


def _subpixel_layer(folded: FoldedConv, top: int, step: float, name: str) -> SubpixelLayer:
    multipliers = np.tile(weight_multipliers(folded.ints.transpose(1, 0, 2, 3)), 4)
    scale = np.tile(folded.scale, 4) / multipliers
    bias = np.rint(np.tile(folded.bias, 4) / (step * scale))
    if np.abs(bias).max(initial=0) >= 2 ** 31 - 1:
        raise ValueError(f"{name}: a folded bias does not fit int32 at this weight scale")
    return SubpixelLayer(ints=subpixel_kernel(folded.ints), multipliers=multipliers, bias=bias.astype(np.int32),
                         scale=scale.astype(np.float32), top=top)


def lower(generator: Generator, block0_sums: str = None) -> IntegerProgram:
    """The integer program of an eval-mode generator of 2-8 bits (see the module docstring); block0 sums as
    `latent_sums(generator, block0_sums)` says."""
    if not 2 <= generator.bits <= 8:
        raise ValueError(f"the integer program is for 2-8-bit generators, not {generator.bits}")
    _check_layout(generator)
    step, top = activation_step(generator.bits), 2 ** generator.bits - 1
    blocks = {}
    for name in integer_layers(generator):
        block = getattr(generator, name)
        blocks[name] = _subpixel_layer(fold_conv(block.conv, block.norm), top, step, name)
    folded = fold_conv(generator.to_image)
    image = ImageLayer(ints=folded.ints, scale=(folded.scale * step).astype(np.float32),
                       bias=folded.bias.astype(np.float32), padding=int(generator.to_image.padding[0]))
    return IntegerProgram(generator.model_args(), _latent_layer(generator, top, step, block0_sums), blocks, image)


# ---------------------------------------------------------------- the ONNX graph

class _Graph:
    """Nodes and initializers of the graph being written; every value gets a unique name."""

    def __init__(self, bits: int):
        self.bits, self.nodes, self.initializers = bits, [], []

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def int_weight(self, name: str, ints: np.ndarray) -> str:
        """Integer weights at rest: INT8, or INT4 packed two per byte (two's complement, low nibble first)."""
        values = np.rint(ints).astype(np.int8)
        if self.bits > 4:
            return self.const(name, values)
        nibbles = (values.flatten() & 0xF).astype(np.uint8)
        if len(nibbles) % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        packed = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()
        self.initializers.append(helper.make_tensor(name, TensorProto.INT4, values.shape, packed, raw=True))
        return name

    def node(self, op: str, inputs: list, output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def channel_vector(self, name: str, values: np.ndarray, dtype=np.float32) -> str:
        return self.const(name, np.asarray(values, dtype).reshape(-1, 1, 1))

    def uint8(self, name: str, value: int) -> str:
        return self.const(name, np.uint8(value))


def _clip_top(g: _Graph, x: str, top: int, name: str) -> str:
    """Below 8 bits the uint8 activation is clipped to 2^bits - 1 (at 8 bits the saturation at 255 is the clamp)."""
    if top >= 255:
        return x
    return g.node("Clip", [x, g.uint8(f"{name}.bottom", 0), g.uint8(f"{name}.top", top)], name)


def _latent(g: _Graph, p: LatentLayer, name: str = "block0") -> str:
    """The kxk transposed conv of a 1x1 input is a matmul: (N, in) @ (in, out * k * k) -> (N, out, k, k), summed
    exactly: the integers of the input's grid limb by limb (`_limb_sums`), or float64 products of float32 inputs
    and integer weights (exact, and so in practice the sums); then scale and bias in float64."""
    embedded = g.node("Gather", [g.const("embed.weight", p.embed), "labels"], "embedded")
    x = g.node("Concat", ["z", embedded], "latent", axis=1)
    if p.sums == "limbs":
        y = _limb_sums(g, x, p, name)
    else:
        x = g.node("Cast", [x], "latent.float64", to=TensorProto.DOUBLE)
        weight = g.node("Cast", [g.int_weight(f"{name}.weight_int", p.ints)], f"{name}.weight", to=TensorProto.DOUBLE)
        y = g.node("MatMul", [x, weight], f"{name}.matmul")
    y = g.node("Reshape", [y, g.const(f"{name}.shape", np.array([-1, len(p.scale), p.side, p.side]))], f"{name}.map")
    y = g.node("Mul", [y, g.channel_vector(f"{name}.scale", p.sum_scale, np.float64)], f"{name}.scaled")
    y = g.node("Add", [y, g.channel_vector(f"{name}.bias", p.bias, np.float64)], f"{name}.affine")
    y = g.node("Cast", [y], f"{name}.float32", to=TensorProto.FLOAT)
    y = g.node("QuantizeLinear", [y, g.const(f"{name}.quant_scale", np.float32(p.quant_scale)),
                                  g.uint8(f"{name}.zero", p.zero)], f"{name}.quantized")
    return _clip_top(g, y, p.top, name)


def _limb_sums(g: _Graph, x: str, p: LatentLayer, name: str) -> str:
    """float32 (N, in) -> float64 (N, out * k * k): sum_i u_i q_i, u = x's grid integers (module docstring).
    Exact at every step: x * 2^fraction_bits, the clip to integer bounds, round half to even and + limb_offset are
    float32 operations on values below 2^21 (exact); the limbs are integers of 7 bits, so MLAS's uint8 x int8
    kernels without VNNI, which add pairs of products in saturating int16, stay exact; each limb's sums are int32
    and their combination int64 (bounds: `_latent_layer`), converted to float64 exactly (below 2^53)."""
    f32 = np.float32
    x = g.node("Mul", [x, g.const(f"{name}.grid_unit", f32(2.0 ** p.fraction_bits))], f"{name}.grid_scaled")
    x = g.node("Clip", [x, g.const(f"{name}.grid_lo", f32(-p.limit)), g.const(f"{name}.grid_hi", f32(p.limit))],
               f"{name}.grid_clipped")
    x = g.node("Round", [x], f"{name}.grid")
    x = g.node("Add", [x, g.const(f"{name}.limb_offset", f32(p.limb_offset))], f"{name}.grid_unsigned")
    x = g.node("Cast", [x], f"{name}.grid_uint32", to=TensorProto.UINT32)
    shifts = np.array(p.limb_shifts)
    x = g.node("BitShift", [x, g.const(f"{name}.limb_shifts", shifts.astype(np.uint32).reshape(-1, 1, 1))],
               f"{name}.limbs_shifted", direction="RIGHT")  # (limbs, N, in)
    x = g.node("BitwiseAnd", [x, g.const(f"{name}.limb_mask", np.uint32(p.limb_mask))], f"{name}.limbs_masked")
    x = g.node("Cast", [x], f"{name}.limbs", to=TensorProto.UINT8)
    weight = g.node("Cast", [g.int_weight(f"{name}.weight_int", p.ints)], f"{name}.weight", to=TensorProto.INT8)
    acc = g.node("MatMulInteger", [x, weight, g.uint8(f"{name}.limb_zero", p.limb_zero)], f"{name}.limb_sums")
    # one slice per limb, widened to int64 and shifted by a multiplication with 2^shift: Split, Cast, Mul and Add
    # run at 4.4 ms at batch 256 where Mul by a (limbs, 1, 1) tensor and ReduceSum took 7.4 ms
    limbs = [f"{name}.limb_sums{k}" for k in range(len(shifts))]
    g.nodes.append(helper.make_node("Split", [acc], limbs, name=f"{name}.limb_split", axis=0,
                                    num_outputs=len(limbs)))
    total = None
    for k, (limb, shift) in enumerate(zip(limbs, p.limb_shifts)):
        term = g.node("Cast", [limb], f"{limb}_int64", to=TensorProto.INT64)
        if shift:
            term = g.node("Mul", [term, g.const(f"{name}.limb_weight{k}", np.int64(2 ** shift))], f"{limb}_shifted")
        total = term if total is None else g.node("Add", [total, term], f"{name}.sums{k}")
    return g.node("Cast", [total], f"{name}.sums_float64", to=TensorProto.DOUBLE)  # (1, N, out * k * k)


def _offset_weight(g: _Graph, ints: np.ndarray, multipliers, name: str) -> str:
    """The stored integers (INT8 or INT4) as the uint8 tensor the integer kernels read, K * q + WEIGHT_OFFSET,
    computed once when the session loads (constant folding of Cast, Mul and Add on initializers)."""
    wide = g.node("Cast", [g.int_weight(f"{name}.weight_int", ints)], f"{name}.weight_int32", to=TensorProto.INT32)
    if multipliers is not None:
        k = g.node("Cast", [g.const(f"{name}.multiplier", multipliers.astype(np.uint8).reshape(-1, 1, 1, 1))],
                   f"{name}.multiplier_int32", to=TensorProto.INT32)
        wide = g.node("Mul", [wide, k], f"{name}.weight_scaled")
    wide = g.node("Add", [wide, g.const(f"{name}.offset", np.int32(WEIGHT_OFFSET))], f"{name}.weight_offset")
    return g.node("Cast", [wide], f"{name}.weight", to=TensorProto.UINT8)


def _subpixel(g: _Graph, x: str, p: SubpixelLayer, name: str) -> str:
    """uint8 activation -> uint8 activation through the sub-pixel QLinearConv (see `subpixel_kernel`). The input
    and output scales are 1, so ONNX Runtime's requantisation multiplier x_scale * w_scale / y_scale is `scale`
    exactly, whatever order it computes it in."""
    one = g.const(f"{name}.unit_scale", np.float32(1.0))
    inputs = [x, one, g.uint8(f"{name}.input_zero", p.input_zero), _offset_weight(g, p.ints, p.multipliers, name),
              g.const(f"{name}.scale", p.scale.astype(np.float32)),
              g.const(f"{name}.weight_zero", np.full(len(p.scale), p.weight_zero, np.uint8)),
              one, g.uint8(f"{name}.output_zero", p.output_zero), g.const(f"{name}.bias", p.bias.astype(np.int32))]
    y = g.node("QLinearConv", inputs, f"{name}.phases", kernel_shape=[2, 2], pads=[1, 1, 1, 1])
    y = _clip_top(g, y, p.top, f"{name}.clipped")
    y = g.node("DepthToSpace", [y], f"{name}.interleaved", blocksize=2, mode="DCR")
    return _crop(g, y, name)


def _crop(g: _Graph, x: str, name: str) -> str:
    """Drop the first and last row and column."""
    return g.node("Slice", [x, g.const(f"{name}.starts", np.array([1, 1])), g.const(f"{name}.ends", np.array([-1, -1])),
                            g.const(f"{name}.axes", np.array([2, 3]))], name)


def _image(g: _Graph, x: str, p: ImageLayer, name: str = "to_image") -> str:
    """Integer sums (ConvInteger), then scale, bias and tanh in float32 single operations."""
    pads = [p.padding] * 4
    acc = g.node("ConvInteger", [x, _offset_weight(g, p.ints, None, name), g.uint8(f"{name}.input_zero", p.input_zero),
                                 g.uint8(f"{name}.weight_zero", p.weight_zero)], f"{name}.acc",
                 kernel_shape=list(p.ints.shape[-2:]), pads=pads)
    y = g.node("Cast", [acc], f"{name}.acc_float", to=TensorProto.FLOAT)
    y = g.node("Mul", [y, g.channel_vector(f"{name}.scale", p.scale)], f"{name}.scaled")
    y = g.node("Add", [y, g.channel_vector(f"{name}.bias", p.bias)], f"{name}.affine")
    return _tanh(g, y)


def _tanh(g: _Graph, x: str, name: str = "tanh") -> str:
    """`TANH` as ONNX nodes of single float32 operations (Clip, Mul, Add, Div), output "images"."""
    f32 = np.float32
    x = g.node("Clip", [x, g.const(f"{name}.lo", f32(-TANH_CLAMP)), g.const(f"{name}.hi", f32(TANH_CLAMP))],
               f"{name}.x")
    x2 = g.node("Mul", [x, x], f"{name}.x2")

    def horner(coefficients, label):
        y = g.node("Mul", [x2, g.const(f"{name}.{label}0", f32(coefficients[0]))], f"{name}.{label}0.mul")
        for i, c in enumerate(coefficients[1:], 1):
            y = g.node("Add", [y, g.const(f"{name}.{label}{i}", f32(c))], f"{name}.{label}{i}.add")
            if i < len(coefficients) - 1:
                y = g.node("Mul", [y, x2], f"{name}.{label}{i}.mul")
        return y
    p = g.node("Mul", [horner(TANH_P, "p"), x], f"{name}.p")
    return g.node("Div", [p, horner(TANH_Q, "q")], "images")


def _float_graph(g: _Graph, generator: Generator):
    """A float (32-bit) generator as a plain float graph: BatchNorm folded into weights and biases."""
    embedded = g.node("Gather", [g.const("embed.weight", generator.embed.weight.detach().cpu().numpy()), "labels"],
                      "embedded")
    x = g.node("Concat", ["z", embedded], "latent", axis=1)
    folded = fold_conv(generator.block0.conv, generator.block0.norm)
    weight = folded.ints.reshape(folded.ints.shape[0], -1)
    y = g.node("MatMul", [x, g.const("block0.weight", weight.astype(np.float32))], "block0.matmul")
    side = folded.ints.shape[-1]
    y = g.node("Reshape", [y, g.const("block0.shape", np.array([-1, folded.ints.shape[1], side, side]))], "block0.map")
    y = g.node("Mul", [y, g.channel_vector("block0.scale", folded.scale)], "block0.scaled")
    x = g.node("Relu", [g.node("Add", [y, g.channel_vector("block0.bias", folded.bias)], "block0.affine")], "block0")
    for name in integer_layers(generator):
        block = getattr(generator, name)
        folded = fold_conv(block.conv, block.norm)
        weight = folded.ints * folded.scale.reshape(1, -1, 1, 1)
        y = g.node("ConvTranspose", [x, g.const(f"{name}.weight", weight.astype(np.float32)),
                                     g.const(f"{name}.bias", folded.bias.astype(np.float32))], f"{name}.conv",
                   kernel_shape=list(block.conv.kernel_size), strides=list(block.conv.stride),
                   pads=list(block.conv.padding) * 2)
        x = g.node("Relu", [y], name)
    conv = generator.to_image
    folded = fold_conv(conv)
    y = g.node("Conv", [x, g.const("to_image.weight", (folded.ints * folded.scale.reshape(-1, 1, 1, 1)).astype(
        np.float32)), g.const("to_image.bias", folded.bias.astype(np.float32))], "to_image.conv",
        kernel_shape=list(conv.kernel_size), pads=list(conv.padding) * 2)
    g.node("Tanh", [y], "images")


def _check_layout(generator: Generator):
    for block in generator.blocks()[1:]:
        conv = block.conv
        if (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding)) != ((4, 4), (2, 2), (1, 1)):
            raise ValueError("the sub-pixel rewrite expects 4x4 transposed convs with stride 2 and padding 1")
    if tuple(generator.block0.conv.padding) != (0, 0):
        raise ValueError("block0 must be a kxk transposed conv of the 1x1 latent input, without padding")


@torch.no_grad()
def build_onnx(generator: Generator, program: IntegerProgram = None) -> onnx.ModelProto:
    """The ONNX model of the eval-mode generator (see the module docstring); below 32 bits written from its
    integer program (`lower(generator)` unless given)."""
    if not supports(generator.bits):
        raise ValueError(f"the runtime artifact supports 2-8 or 32 bits, not {generator.bits}")
    g = _Graph(generator.bits)
    if generator.bits >= 32:
        _float_graph(g, generator)
        return _model(g, generator)
    program = program or lower(generator)
    x = _latent(g, program.latent)
    for name, layer in program.blocks.items():
        x = _subpixel(g, x, layer, name)
    _image(g, x, program.image)
    return _model(g, generator, {"block0_sums": program.latent.sums})


def _model(g: _Graph, generator: Generator, extra: dict = None) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", generator.nz]),
              helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"])]
    outputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", generator.image_channels,
                                                                             generator.image_size, generator.image_size])]
    graph = helper.make_graph(g.nodes, "generator", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=FORMAT)
    model.ir_version = 10
    info = {"format": FORMAT, "nz": generator.nz, "num_classes": generator.num_classes, "bits": generator.bits,
            "channels": ",".join(map(str, generator.channels)),
            "float_layers": ",".join(float_layers(generator)), "activation_range": ACT_RANGE, **(extra or {})}
    helper.set_model_props(model, {key: str(value) for key, value in info.items()})
    onnx.checker.check_model(model)
    return model


def float_layers(generator: Generator) -> list:
    """The layers that run in float arithmetic in the runtime (all of them for a float generator)."""
    return list(FLOAT_LAYERS) if generator.bits < 32 else [*generator.prunable_layers, "to_image"]


def integer_layers(generator: Generator) -> list:
    """The upsampling blocks after block0: QLinearConv in the runtime (float ConvTranspose for a float model)."""
    return list(generator.prunable_layers[1:])


# ---------------------------------------------------------------- writing, verifying, measuring

def save_runtime_artifact(generator: Generator, path: str, program: IntegerProgram = None) -> int:
    """Write `generator.onnx` atomically (one file: no external data); returns its size in bytes."""
    model = build_onnx(generator, program)
    tmp = f"{path}.tmp.{os.getpid()}"
    onnx.save_model(model, tmp)
    os.replace(tmp, path)
    return os.path.getsize(path)


def expected_bytes(generator: Generator) -> int:
    """What the artifact's tensors must take: every conv weight at its stored width (4 bits packed, else 8; 32
    for a float model) and every other parameter, scale and bias as a 4-byte number. The file adds only the graph
    (a few kB) and, in the sub-pixel layers, each channel's scale, bias and zero point once per phase."""
    convs = [block.conv for block in generator.blocks()] + [generator.to_image]
    weight_bits = 32 if generator.bits >= 32 else (4 if generator.bits <= 4 else 8)
    weights = sum(conv.weight.numel() for conv in convs)
    others = generator.embed.weight.numel() + sum(2 * conv.weight.shape[conv.out_dim] for conv in convs)
    return math.ceil(weights * weight_bits / 8) + 4 * others


@dataclasses.dataclass
class VerifySettings:
    num_samples: int = 1024
    batch_size: int = 256
    seed: int = 0
    tolerance: float = TOLERANCE
    pixel_share: float = PIXEL_SHARE
    mean_tolerance: float = MEAN_TOLERANCE


def judge(diff: np.ndarray, settings: VerifySettings) -> dict:
    """The second guard's verdict on the per-pixel abs differences `diff` to the generator (module docstring)."""
    finite = bool(np.isfinite(diff).all())
    over = int((diff > settings.tolerance).sum()) if finite else diff.size
    mean = float(diff.mean()) if finite else math.inf
    return {"max_abs_diff": float(diff.max()) if finite else math.inf, "mean_abs_diff": mean,
            "pixels_over_tolerance": over, "num_pixels": int(diff.size), "tolerance": settings.tolerance,
            "pixel_share": settings.pixel_share, "mean_tolerance": settings.mean_tolerance,
            "ok": finite and mean <= settings.mean_tolerance and over <= settings.pixel_share * diff.size}


@torch.no_grad()
def verify_runtime(generator: Generator, path: str, settings: VerifySettings = VerifySettings(),
                   program: IntegerProgram = None) -> dict:
    """The artifact at `path` against the eval-mode generator on seeded inputs (module docstring). Below 32 bits:
    its images must equal, bit for bit, those of the eager integer reference of `program` (default
    `lower(generator)`), and `program` must compute the generator's layers (`reference.layer_check`); the images'
    differences to the generator's are reported (`judge`), not required. At 32 bits they must pass `judge`."""
    from utils.compression.reference import layer_check, merge_layer_checks, reference_images
    if program is None and generator.bits < 32:
        program = lower(generator)
    was_training = generator.training
    generator.eval()
    session = load_session(path)
    z, labels = generator.sample_inputs(settings.num_samples, generator=torch.Generator().manual_seed(settings.seed))
    diffs, mismatches, layer_checks = [], 0, []
    device = generator.embed.weight.device
    on_cpu = generator if device.type == "cpu" else copy.deepcopy(generator).cpu()
    for i in range(0, settings.num_samples, settings.batch_size):
        zb, yb = z[i:i + settings.batch_size], labels[i:i + settings.batch_size]
        images = generate(session, zb.numpy(), yb.numpy())
        diffs.append(np.abs(images - generator(zb.to(device), yb.to(device)).cpu().numpy()))
        if program is not None:  # NaN never equals: a NaN image is a mismatch
            mismatches += int((images != reference_images(program, zb, yb).numpy()).sum())
            layer_checks.append(layer_check(program, on_cpu, zb, yb))
    generator.train(was_training)
    verdict = judge(np.concatenate(diffs), settings)
    if program is None:
        return {**verdict, "exact": None, "reference_mismatches": None, "layer_check": None,
                "num_samples": settings.num_samples}
    layers = merge_layer_checks(layer_checks)
    exact = mismatches == 0
    return {**verdict, "images_ok": verdict["ok"], "exact": exact, "reference_mismatches": mismatches,
            "layer_check": layers, "ok": exact and layers["ok"], "num_samples": settings.num_samples}


def runtime_cost(path: str, threads: int = None, speed: dict = None) -> dict:
    """Bytes of the artifact, and with `speed` (ort_runner.measure_speed keyword arguments, may be empty) its
    latency at batch 1 and throughput in ONNX Runtime, on `threads` threads (default: torch's count)."""
    row = {"bytes": os.path.getsize(path)}
    if speed is not None:
        row.update(measure_speed(load_session(path, threads or torch.get_num_threads()), **speed))
    return row


def _refusal(check: dict, settings: VerifySettings) -> str:
    if check["exact"] is False:
        return (f"{RUNTIME_NAME} differs from its integer reference (utils/compression/reference.py) in "
                f"{check['reference_mismatches']} of {check['num_pixels']} pixels on {settings.num_samples} samples")
    if check.get("layer_check") is not None:
        layers = check["layer_check"]
        wrong = [f"{name}: {v['violations']} of {v['activations']} activations more than half a step plus "
                 f"{v['max_bound'] - 0.5:.2g} from the generator's (largest {v['max_distance']:.3g} steps)"
                 for name, v in layers["layers"].items() if v["violations"]]
        if layers["image_max_abs_diff"] > layers["image_tolerance"]:
            wrong.append(f"to_image: a pixel {layers['image_max_abs_diff']:.3g} from the generator's (at most "
                         f"{layers['image_tolerance']:g})")
        return (f"the integer program of {RUNTIME_NAME} does not compute the generator's layers on "
                f"{settings.num_samples} samples: " + "; ".join(wrong))
    return (f"{RUNTIME_NAME} differs from the generator: mean abs difference {check['mean_abs_diff']:.3g} (at most "
            f"{settings.mean_tolerance:g}), {check['pixels_over_tolerance']} of {check['num_pixels']} pixels off by "
            f"more than {settings.tolerance:g} (at most {settings.pixel_share:.1%}; max {check['max_abs_diff']:.3g}) "
            f"on {settings.num_samples} samples")


def write_runtime_files(generator: Generator, run_dir: str, settings: VerifySettings = VerifySettings()) -> dict:
    """`generator.onnx` and a copy of the runtime-only runner (`ort_runner.py`) in `run_dir`, the artifact checked
    by `verify_runtime`; returns what the run's report says about it. A generator of 9-16 bits gets none (its
    activations have no integer type in the runtime): the report says so. Raises RuntimeError, after removing the
    file, when the check fails."""
    if not supports(generator.bits):
        return {"runtime_artifact": None,
                "runtime_note": f"no runtime artifact for {generator.bits}-bit generators (2-8 or 32 bits only)"}
    path = os.path.join(run_dir, RUNTIME_NAME)
    program = lower(generator) if generator.bits < 32 else None
    size = save_runtime_artifact(generator, path, program)
    check = verify_runtime(generator, path, settings, program)
    if not check["ok"]:
        os.remove(path)
        raise RuntimeError(_refusal(check, settings))
    shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), RUNNER_NAME),
                    os.path.join(run_dir, RUNNER_NAME))
    return {"runtime_artifact": RUNTIME_NAME, "runtime_bytes": size, "runtime": f"onnxruntime {ort_version()}",
            "runtime_runner": RUNNER_NAME, "runtime_exact": check["exact"],
            "runtime_reference_mismatches": check["reference_mismatches"],
            "runtime_layer_check": check["layer_check"],
            "runtime_max_abs_diff": check["max_abs_diff"],
            "runtime_mean_abs_diff": check["mean_abs_diff"], "runtime_tolerance": settings.tolerance,
            "runtime_pixels_over_tolerance": check["pixels_over_tolerance"],
            "runtime_pixel_share": settings.pixel_share,
            "runtime_mean_tolerance": settings.mean_tolerance,
            "runtime_check_samples": settings.num_samples, "runtime_float_layers": float_layers(generator),
            "runtime_integer_layers": [] if generator.bits >= 32 else integer_layers(generator),
            **block0_report(program)}


def block0_report(program: IntegerProgram = None) -> dict:
    """What compression.json says about block0's sums: limbs or float64, and the limbs' grid and `grid_bound`."""
    if program is None:
        return {}
    p = program.latent
    report = {"runtime_block0_sums": p.sums}
    if p.sums == "limbs":
        report.update(runtime_block0_grid=2.0 ** -p.fraction_bits,
                      runtime_block0_grid_range=p.limit / 2 ** p.fraction_bits,
                      runtime_block0_grid_bound_steps=grid_bound(p))
    return report


def ort_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


def runtime_forward(path: str, threads: int = None):
    """The artifact behind the generator's calling convention: run(z, labels) -> images, torch tensors in and out
    (for evaluating the samples of what ships with the same code as a torch generator's)."""
    session = load_session(path, threads or torch.get_num_threads())

    def run(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(generate(session, z.cpu().numpy(), labels.cpu().numpy())).to(z.device)
    return run


# ---------------------------------------------------------------- the teacher in the same runtime

TEACHER_RUNTIME_NAME = "teacher.onnx"
BASELINE_TOLERANCE = 1e-4  # |ONNX Runtime - eager| of the teacher's float graph (float sums in another order)


@torch.no_grad()
def teacher_baseline(teacher: Generator, folder: str, num_samples: int = 64) -> dict:
    """The baseline of the in-runtime ratios: the teacher's own float ONNX model (`build_onnx` of the float
    generator, run by the same ONNX Runtime as the artifacts) written to `folder`, and checked to compute the eager
    teacher within BASELINE_TOLERANCE on seeded inputs. Returns {"path", "bytes", "max_abs_diff_to_eager"};
    RuntimeError when the check fails (a baseline that is not the teacher would make every ratio meaningless)."""
    if teacher.bits < 32:
        raise ValueError(f"the teacher baseline is a float (32-bit) generator, not {teacher.bits}-bit")
    model = copy.deepcopy(teacher).cpu().eval()
    path = os.path.join(folder, TEACHER_RUNTIME_NAME)
    size = save_runtime_artifact(model, path)
    z, labels = model.sample_inputs(num_samples, generator=torch.Generator().manual_seed(0))
    diff = float(np.abs(generate(load_session(path), z.numpy(), labels.numpy()) - model(z, labels).numpy()).max())
    if not diff <= BASELINE_TOLERANCE:
        raise RuntimeError(f"the teacher's ONNX model differs from the eager teacher by {diff:.3g}")
    return {"path": path, "bytes": size, "max_abs_diff_to_eager": diff}


def runtime_cost_row(model: Generator, path: str = None, speed: dict = None, threads: int = None) -> dict:
    """`utils.compression.cost.cost_row`'s columns for the artifact as it runs in ONNX Runtime: parameters and MACs of
    `model`, bytes of the file at `path`, latency and throughput in the runtime (with `speed`). Without `path` the
    artifact of `model` is written to a temporary folder first."""
    from utils.compression.cost import count_macs, count_parameters
    if path is None:
        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, RUNTIME_NAME)
            save_runtime_artifact(model, path)
            return runtime_cost_row(model, path, speed, threads)
    return {"parameters": count_parameters(model), "macs": count_macs(model),
            **runtime_cost(path, threads, speed)}
