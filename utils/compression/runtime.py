"""The on-device artifact: the compact generator as an ONNX model that ONNX Runtime runs with integer weights inside.

`generator.onnx` needs ONNX Runtime (and numpy) and nothing else: `utils/compression/ort_runner.py` runs it without
torch. Why ONNX Runtime and not ExecuTorch: see benchmarks/results/runtime_choice.md.

The graph is written directly from the compact `Generator`'s integer weights (no exporter, no fake-quantisation
arithmetic), in a form whose heavy layers run on ONNX Runtime's integer kernels:

    z, labels -> Gather(embedding) ++ z -> block0 -> block1 ... blockN -> to_image -> Tanh
    (N = 2 at 28x28, 3 at 32, 4 at 64)

* Every BatchNorm is folded into its conv's per-output-channel weight scale and a bias: BN(conv(x, q * s)) =
  conv(x, q) * (s * a) + b with a = gamma / sqrt(var + eps), b = beta - mean * a. The integers q stay the
  student's (their sign flips where a < 0, so that every scale is positive).
* An activation (ReLU, clamp to [0, ACT_RANGE], 2^bits - 1 uniform steps) IS a uint8 tensor with scale
  ACT_RANGE / (2^bits - 1) and zero point 0: QuantizeLinear / QLinearConv saturate at 0 and 255, which is the ReLU
  and, at 8 bits, the clamp (below 8 bits a Clip to 2^bits - 1 follows).
* block1 to blockN (4x4 transposed convs, stride 2; ONNX Runtime's CPU provider has no integer transposed conv)
  are rewritten exactly as sub-pixel convolutions: one QLinearConv with 2x2 kernels and 4x the output channels
  (each of the 16 taps of the transposed kernel lands in exactly one of 4 phases), DepthToSpace, and a one-pixel
  crop. Integer products, int32 accumulation, requantised straight to the next activation. The weights run as
  uint8 (q + 128, zero point 128): with int8 weights, ONNX Runtime's x86 kernels without VNNI add pairs of uint8 x
  int8 products in saturating int16 (255 x 127 x 2 > 32767), which moved activations of full-range weights.
  The folded bias is an int32 on the accumulator's grid (activation step x weight scale); to make that grid finer,
  each channel's weights are multiplied by K = 127 // max |q| (`weight_multipliers`; >= 18 at 4 bits) when the
  session loads, and its scale divided by K.
* block0 (the latent vector is a float input) and to_image (its output is a float image) run in float: their
  integer weights are cast to float once when the session loads (Cast of an initializer is constant-folded), and
  the per-channel scale multiplies the matmul / conv output.

Verification (`verify_runtime`): the runtime's images are not bit-identical to the compact model's. An activation
that lies within the bias's rounding (or float summation order) of a rounding boundary can land one step away, and
the step spreads through the later layers. Such flips are rare and local (about one activation in a million
here, so their count grows with the samples and the layer sizes); an error of the graph (a wrong scale, a
misplaced channel or label) moves every image. So the check is two-fold (images in [-1, 1]): the mean abs
difference per pixel is at most MEAN_TOLERANCE, and at most PIXEL_SHARE of the pixels are off by more than
TOLERANCE. Measured on 1,024 samples of trained 4-bit students of the sweep (300 steps from the quick teacher):
247/92/54 channels: mean 2.4e-4, max 0.077, 3 of 1,024 images with a pixel above 0.05; 255/61/54: mean 3.0e-4,
max 0.097, 61 of 803k pixels (7.6e-5) above 0.05 in 46 images, 99.9th percentile 0.024; 75/5/x (cost penalty,
rho 0.15, a block of 5 channels, so one flip moves more pixels): mean 3.7e-4, max 0.18, 959 pixels (0.12 %) above
0.05. PIXEL_SHARE = 1 % sits above these; the mean guards against systematic errors (tested: a 0.01 shift of the
output bias fails it). On a pruned copy of a trained quick-preset teacher (96/48/24, 4,096 samples): max 0.0006 at
8 bits, 0.008 at 4.

Weights are stored as INT8 initializers, or INT4 (ONNX's packed type, two per byte) for <= 4 bits, plus float
scales and biases. 32-bit (float) generators are written as a plain float graph (transposed convs as they are).
"""
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
TOLERANCE = 0.05  # |runtime - compact| of one pixel, images in [-1, 1] (see the module docstring)
PIXEL_SHARE = 0.01  # share of the pixels allowed above TOLERANCE (rounding-boundary flips; measured up to 0.12 %)
MEAN_TOLERANCE = 1e-3  # mean |runtime - compact| per pixel
FLOAT_LAYERS = ("block0", "to_image")  # integer weights, float arithmetic (see the module docstring)


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

    @property
    def step(self) -> float:
        return ACT_RANGE / (2 ** self.bits - 1)

    def channel_vector(self, name: str, values: np.ndarray) -> str:
        return self.const(name, values.astype(np.float32).reshape(-1, 1, 1))


def _quantize_activation(g: _Graph, x: str, name: str) -> str:
    """float pre-activation -> the uint8 activation (ReLU, clamp, round to the step)."""
    if g.bits < 8:
        x = g.node("Clip", [x, g.const(f"{name}.lo", np.float32(0)), g.const(f"{name}.hi", np.float32(ACT_RANGE))],
                   f"{name}.clipped")
    return g.node("QuantizeLinear", [x, g.const(f"{name}.step", np.float32(g.step)),
                                     g.const(f"{name}.zero", np.uint8(0))], name)


def _block0(g: _Graph, x: str, folded: FoldedConv, name: str = "block0") -> str:
    """The kxk transposed conv of a 1x1 input is a matmul: (N, in) @ (in, out * k * k) -> (N, out, k, k)."""
    ints = folded.ints.reshape(folded.ints.shape[0], -1)
    if g.bits < 32:
        weight = g.node("Cast", [g.int_weight(f"{name}.weight_int", ints)], f"{name}.weight", to=TensorProto.FLOAT)
    else:
        weight = g.const(f"{name}.weight", ints.astype(np.float32))
    y = g.node("MatMul", [x, weight], f"{name}.matmul")
    side = folded.ints.shape[-1]
    y = g.node("Reshape", [y, g.const(f"{name}.shape", np.array([-1, folded.ints.shape[1], side, side]))],
               f"{name}.map")
    y = g.node("Mul", [y, g.channel_vector(f"{name}.scale", folded.scale)], f"{name}.scaled")
    y = g.node("Add", [y, g.channel_vector(f"{name}.bias", folded.bias)], f"{name}.affine")
    if g.bits >= 32:
        return g.node("Relu", [y], name)
    return _quantize_activation(g, y, name)


def weight_multipliers(ints: np.ndarray) -> np.ndarray:
    """K per output channel of a (out, ...) integer kernel: the integers are multiplied by K (still within int8)
    and their scale divided by K, which leaves the weights unchanged but makes the int32 bias's grid (one unit =
    activation step x weight scale) K times finer. K = 127 // max |q| of the channel: 1 for a full 8-bit channel,
    >= 18 at 4 bits, and large where the student's scale came from a weight of a removed input channel."""
    max_abs = np.abs(ints).reshape(len(ints), -1).max(axis=1)
    return 127 // np.maximum(max_abs, 1).astype(np.int64)


WEIGHT_OFFSET = 128  # QLinearConv reads the weights as uint8 K * q + 128, zero point 128 (see the docstring)


def _runtime_weight(g: _Graph, ints: np.ndarray, multipliers: np.ndarray, name: str) -> str:
    """The stored integers (INT8 or INT4) as the uint8 tensor QLinearConv reads, K * q + 128, computed once when
    the session loads (constant folding of Cast, Mul and Add on initializers)."""
    wide = g.node("Cast", [g.int_weight(f"{name}.weight_int", ints)], f"{name}.weight_int32", to=TensorProto.INT32)
    k = g.node("Cast", [g.const(f"{name}.multiplier", multipliers.astype(np.uint8).reshape(-1, 1, 1, 1))],
               f"{name}.multiplier_int32", to=TensorProto.INT32)
    wide = g.node("Mul", [wide, k], f"{name}.weight_scaled")
    wide = g.node("Add", [wide, g.const(f"{name}.offset", np.int32(WEIGHT_OFFSET))], f"{name}.weight_offset")
    return g.node("Cast", [wide], f"{name}.weight", to=TensorProto.UINT8)


def _qlinear_block(g: _Graph, x: str, folded: FoldedConv, name: str) -> str:
    """uint8 activation -> uint8 activation through the sub-pixel QLinearConv (see `subpixel_kernel`): integer
    products summed in int32 with an int32 bias, requantised straight to the next activation's step."""
    kernel = subpixel_kernel(folded.ints)
    multipliers = np.tile(weight_multipliers(folded.ints.transpose(1, 0, 2, 3)), 4)
    scale = np.tile(folded.scale, 4) / multipliers
    bias = np.rint(np.tile(folded.bias, 4) / (g.step * scale))
    if np.abs(bias).max(initial=0) >= 2 ** 31 - 1:
        raise ValueError(f"{name}: a folded bias does not fit int32 at this weight scale")
    step, zero = g.const(f"{name}.step", np.float32(g.step)), g.const(f"{name}.zero", np.uint8(0))
    weight_zero = np.full(len(scale), WEIGHT_OFFSET, np.uint8)
    inputs = [x, step, zero, _runtime_weight(g, kernel, multipliers, name),
              g.const(f"{name}.scale", scale.astype(np.float32)), g.const(f"{name}.weight_zero", weight_zero),
              step, zero,
              g.const(f"{name}.bias", bias.astype(np.int32))]
    y = g.node("QLinearConv", inputs, f"{name}.phases", kernel_shape=[2, 2], pads=[1, 1, 1, 1])
    if g.bits < 8:
        y = g.node("Clip", [y, zero, g.const(f"{name}.top", np.uint8(2 ** g.bits - 1))], f"{name}.clipped")
    y = g.node("DepthToSpace", [y], f"{name}.interleaved", blocksize=2, mode="DCR")
    return _crop(g, y, name)


def _crop(g: _Graph, x: str, name: str) -> str:
    """Drop the first and last row and column."""
    return g.node("Slice", [x, g.const(f"{name}.starts", np.array([1, 1])), g.const(f"{name}.ends", np.array([-1, -1])),
                            g.const(f"{name}.axes", np.array([2, 3]))], name)


def _float_block(g: _Graph, x: str, folded: FoldedConv, conv, name: str) -> str:
    """A float transposed conv with its BatchNorm folded into weight and bias (32-bit generators)."""
    weight = folded.ints * folded.scale.reshape(1, -1, 1, 1)
    y = g.node("ConvTranspose", [x, g.const(f"{name}.weight", weight.astype(np.float32)),
                                 g.const(f"{name}.bias", folded.bias.astype(np.float32))], f"{name}.conv",
               kernel_shape=list(conv.kernel_size), strides=list(conv.stride), pads=list(conv.padding) * 2)
    return g.node("Relu", [y], name)


def _to_image(g: _Graph, x: str, folded: FoldedConv, conv, name: str = "to_image") -> str:
    if g.bits < 32:
        x = g.node("DequantizeLinear", [x, g.const(f"{name}.in_step", np.float32(g.step)),
                                        g.const(f"{name}.in_zero", np.uint8(0))], f"{name}.input")
        weight = g.node("Cast", [g.int_weight(f"{name}.weight_int", folded.ints)], f"{name}.weight",
                        to=TensorProto.FLOAT)
    else:
        weight = g.const(f"{name}.weight", folded.ints.astype(np.float32))
    y = g.node("Conv", [x, weight], f"{name}.conv", kernel_shape=list(conv.kernel_size), pads=list(conv.padding) * 2)
    y = g.node("Mul", [y, g.channel_vector(f"{name}.scale", folded.scale)], f"{name}.scaled")
    y = g.node("Add", [y, g.channel_vector(f"{name}.bias", folded.bias)], f"{name}.affine")
    return g.node("Tanh", [y], "images")


def _check_layout(generator: Generator):
    for block in generator.blocks()[1:]:
        conv = block.conv
        if (tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding)) != ((4, 4), (2, 2), (1, 1)):
            raise ValueError("the sub-pixel rewrite expects 4x4 transposed convs with stride 2 and padding 1")
    if tuple(generator.block0.conv.padding) != (0, 0):
        raise ValueError("block0 must be a kxk transposed conv of the 1x1 latent input, without padding")


@torch.no_grad()
def build_onnx(generator: Generator) -> onnx.ModelProto:
    """The ONNX model of the eval-mode generator (see the module docstring)."""
    if not supports(generator.bits):
        raise ValueError(f"the runtime artifact supports 2-8 or 32 bits, not {generator.bits}")
    _check_layout(generator)
    g = _Graph(generator.bits)
    embedded = g.node("Gather", [g.const("embed.weight", generator.embed.weight.detach().cpu().numpy()), "labels"],
                      "embedded")
    x = g.node("Concat", ["z", embedded], "latent", axis=1)
    x = _block0(g, x, fold_conv(generator.block0.conv, generator.block0.norm))
    for name in integer_layers(generator):
        block = getattr(generator, name)
        folded = fold_conv(block.conv, block.norm)
        x = _qlinear_block(g, x, folded, name) if g.bits < 32 else _float_block(g, x, folded, block.conv, name)
    _to_image(g, x, fold_conv(generator.to_image), generator.to_image)
    return _model(g, generator)


def _model(g: _Graph, generator: Generator) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", generator.nz]),
              helper.make_tensor_value_info("labels", TensorProto.INT64, ["N"])]
    outputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", generator.image_channels,
                                                                             generator.image_size, generator.image_size])]
    graph = helper.make_graph(g.nodes, "generator", inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=FORMAT)
    model.ir_version = 10
    info = {"format": FORMAT, "nz": generator.nz, "num_classes": generator.num_classes, "bits": generator.bits,
            "channels": ",".join(map(str, generator.channels)),
            "float_layers": ",".join(float_layers(generator)), "activation_range": ACT_RANGE}
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

def save_runtime_artifact(generator: Generator, path: str) -> int:
    """Write `generator.onnx` atomically (one file: no external data); returns its size in bytes."""
    model = build_onnx(generator)
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
    """The verdict on the per-pixel abs differences `diff` (any shape; module docstring)."""
    finite = bool(np.isfinite(diff).all())
    over = int((diff > settings.tolerance).sum()) if finite else diff.size
    mean = float(diff.mean()) if finite else math.inf
    return {"max_abs_diff": float(diff.max()) if finite else math.inf, "mean_abs_diff": mean,
            "pixels_over_tolerance": over, "num_pixels": int(diff.size), "tolerance": settings.tolerance,
            "pixel_share": settings.pixel_share, "mean_tolerance": settings.mean_tolerance,
            "ok": finite and mean <= settings.mean_tolerance and over <= settings.pixel_share * diff.size}


@torch.no_grad()
def verify_runtime(generator: Generator, path: str, settings: VerifySettings = VerifySettings()) -> dict:
    """|runtime(z, y) - generator(z, y)| over seeded inputs, the generator in eval mode, judged by `judge`. Not
    zero: the runtime sums in another order (and in integers), so an activation that sits within float rounding of
    a rounding boundary may land one step away; that step then spreads through the later layers."""
    was_training = generator.training
    generator.eval()
    session = load_session(path)
    z, labels = generator.sample_inputs(settings.num_samples, generator=torch.Generator().manual_seed(settings.seed))
    diffs = []
    for i in range(0, settings.num_samples, settings.batch_size):
        zb, yb = z[i:i + settings.batch_size], labels[i:i + settings.batch_size]
        expected = generator(zb.to(generator.embed.weight.device), yb.to(generator.embed.weight.device)).cpu()
        diffs.append(np.abs(generate(session, zb.numpy(), yb.numpy()) - expected.numpy()))
    generator.train(was_training)
    return {**judge(np.concatenate(diffs), settings), "num_samples": settings.num_samples}


def runtime_cost(path: str, threads: int = None, speed: dict = None) -> dict:
    """Bytes of the artifact, and with `speed` (ort_runner.measure_speed keyword arguments, may be empty) its
    latency at batch 1 and throughput in ONNX Runtime, on `threads` threads (default: torch's count)."""
    row = {"bytes": os.path.getsize(path)}
    if speed is not None:
        row.update(measure_speed(load_session(path, threads or torch.get_num_threads()), **speed))
    return row


def write_runtime_files(generator: Generator, run_dir: str, settings: VerifySettings = VerifySettings()) -> dict:
    """`generator.onnx` and a copy of the runtime-only runner (`ort_runner.py`) in `run_dir`, the artifact checked
    against `generator`; returns what the run's report says about it. A generator of 9-16 bits gets none (its
    activations have no integer type in the runtime): the report says so. Raises RuntimeError, after removing the
    file, when the artifact differs from the generator by more than the tolerance."""
    if not supports(generator.bits):
        return {"runtime_artifact": None,
                "runtime_note": f"no runtime artifact for {generator.bits}-bit generators (2-8 or 32 bits only)"}
    path = os.path.join(run_dir, RUNTIME_NAME)
    size = save_runtime_artifact(generator, path)
    check = verify_runtime(generator, path, settings)
    if not check["ok"]:
        os.remove(path)
        raise RuntimeError(f"{RUNTIME_NAME} differs from the generator: mean abs difference "
                           f"{check['mean_abs_diff']:.3g} (at most {settings.mean_tolerance:g}), "
                           f"{check['pixels_over_tolerance']} of {check['num_pixels']} pixels off by more than "
                           f"{settings.tolerance:g} (at most {settings.pixel_share:.1%}; "
                           f"max {check['max_abs_diff']:.3g}) on {settings.num_samples} samples")
    shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), RUNNER_NAME),
                    os.path.join(run_dir, RUNNER_NAME))
    return {"runtime_artifact": RUNTIME_NAME, "runtime_bytes": size, "runtime": f"onnxruntime {ort_version()}",
            "runtime_runner": RUNNER_NAME, "runtime_max_abs_diff": check["max_abs_diff"],
            "runtime_mean_abs_diff": check["mean_abs_diff"], "runtime_tolerance": settings.tolerance,
            "runtime_pixels_over_tolerance": check["pixels_over_tolerance"],
            "runtime_pixel_share": settings.pixel_share,
            "runtime_mean_tolerance": settings.mean_tolerance,
            "runtime_check_samples": settings.num_samples, "runtime_float_layers": float_layers(generator),
            "runtime_integer_layers": [] if generator.bits >= 32 else integer_layers(generator)}


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


def runtime_cost_row(model: Generator, path: str = None, speed: dict = None, threads: int = None) -> dict:
    """`utils.compression.cost.cost_row`'s columns for the artifact as it runs in ONNX Runtime: parameters and MACs of
    `model`, bytes of the file at `path`, latency and throughput in the runtime (with `speed`). Without `path` the
    artifact of `model` is written to a temporary folder first (e.g. the float teacher, for a same-runtime
    comparison)."""
    from utils.compression.cost import count_macs, count_parameters
    if path is None:
        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, RUNTIME_NAME)
            save_runtime_artifact(model, path)
            return runtime_cost_row(model, path, speed, threads)
    return {"parameters": count_parameters(model), "macs": count_macs(model),
            **runtime_cost(path, threads, speed)}
