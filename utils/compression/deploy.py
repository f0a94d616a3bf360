"""The compact generator as it ships: the on-device artifact, the integer weight file and a debugging export.

What a device runs is `generator.onnx` (utils/compression/runtime.py: ONNX Runtime, integer weights inside, a torch-free
runner `ort_runner.py` beside it); `write_device_artifacts` writes and checks all three files, and
`shipped_cost_rows` measures what ships beside the teacher, like for like: the artifact in ONNX Runtime against the
teacher's own float ONNX model in the same runtime, timed in one process, interleaved (the rows and ratios of
utils/compression/cost.py).

Integer artifact (`generator_int.pt`, read with `torch.load(weights_only=True)`): a dict

    format, format_version, model_args        -> rebuilds the Generator
    quantized: {"<layer>.weight": {encoding, data, scale, shape, out_dim, bits}}
    float:     every other state entry (embedding, BatchNorm, biases, ...) as stored

A quantised conv weight is stored as its integers q = clamp(round(W / scale), -qmax, qmax) (`weight_to_int`, with
the layer's stored per-output-channel `weight_scale`, never recomputed) plus the float scales: `int8` for
5-8 bits, `int4` (two 4-bit values per uint8 byte, offset binary: nibble = q + 8, low nibble first, a
zero pad nibble when the count is odd) for <= 4 bits, `int16` for 9-16 bits. A float (32-bit) generator is stored
entirely in `float`. Loading sets each float weight to q * scale: exactly the fake-quantised weight the compact
model uses in eval mode, so the reloaded model's eval output is bit-identical.

Exported program (`generator.pt2`), a float debugging export (its weights are stored as floats, so it is as large
as a float model): `torch.export` of the eval-mode compact generator with the weight
quantisation folded in (weights replaced by their dequantised values q * scale, so no rounding of weights at run
time; activation quantisation stays, it is part of the function). Inputs: z float32 [N, nz], labels int64 [N],
N dynamic. A process with only torch runs it: `torch.export.load(path).module()(z, labels)`.
"""
import copy
import os
import tempfile

import torch

from models import Generator
from models.quant import QuantConv2d, QuantConvTranspose2d, quantize_weight, weight_to_int
from utils.compression.cost import (RUNTIME_SUFFIX, SAME_RUNTIME, TEACHER, TEACHER_RUNTIME, add_ratios,
                                    add_same_runtime_ratios, state_dict_bytes, timed_rows)
from utils.compression.runtime import (RUNTIME_NAME, VerifySettings, runtime_forward, teacher_baseline,
                                       write_runtime_files)
from utils.run.files import atomic_write

FORMAT = "device-gan-generator-int"
FORMAT_VERSION = 1
ARTIFACT_NAME = "generator_int.pt"
PROGRAM_NAME = "generator.pt2"
PROGRAM_NOTE = "float debugging export (weights stored as floats); the device artifact is generator.onnx"
INT4_OFFSET = 8
DEPLOY_TOLERANCE = 1e-6  # a reloaded artifact or exported program vs the model it was written from


# ---------------------------------------------------------------- integer packing

def encoding_for(bits: int) -> str:
    if bits <= 4:
        return "int4"
    if bits <= 8:
        return "int8"
    if bits <= 16:
        return "int16"
    return "float32"


def stored_bits(bits: int) -> int:
    """Bits per weight on disk for a `bits`-bit model."""
    return {"int4": 4, "int8": 8, "int16": 16, "float32": 32}[encoding_for(bits)]


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Integers in [-8, 7] (any shape) -> uint8, two per byte (low nibble first, zero pad nibble if odd)."""
    flat = values.detach().flatten().to(torch.int16)
    if len(flat) and (flat.min() < -INT4_OFFSET or flat.max() > INT4_OFFSET - 1):
        raise ValueError(f"int4 values must lie in [-8, 7], got [{int(flat.min())}, {int(flat.max())}]")
    nibbles = (flat + INT4_OFFSET).to(torch.uint8)
    if len(nibbles) % 2:
        nibbles = torch.cat([nibbles, torch.zeros(1, dtype=torch.uint8)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_int4`: the first `numel` values, as int8."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or len(packed) != (numel + 1) // 2:
        raise ValueError(f"{len(packed)} packed bytes cannot hold {numel} int4 values")
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten()[:numel]
    return nibbles.to(torch.int8) - INT4_OFFSET


def encode_ints(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer-valued tensor -> its storage tensor (packed uint8, int8 or int16)."""
    encoding = encoding_for(bits)
    if encoding == "int4":
        return pack_int4(q)
    dtype = {"int8": torch.int8, "int16": torch.int16}[encoding]
    info = torch.iinfo(dtype)
    if q.numel() and (q.min() < info.min or q.max() > info.max):
        raise ValueError(f"values out of the {encoding} range")
    return q.detach().to(dtype).clone()


def decode_ints(entry: dict) -> torch.Tensor:
    """Storage entry -> integers (int8/int16 tensor of the weight's shape)."""
    shape = list(entry["shape"])
    if entry["encoding"] == "int4":
        return unpack_int4(entry["data"], int(torch.Size(shape).numel())).view(shape)
    return entry["data"].view(shape)


def _broadcast(scale: torch.Tensor, shape, out_dim: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[out_dim] = -1
    return scale.view(view)


def dequantize(entry: dict) -> torch.Tensor:
    """q * scale: the fake-quantised float weight."""
    q = decode_ints(entry)
    return q.to(torch.float32) * _broadcast(entry["scale"], q.shape, entry["out_dim"])


# ---------------------------------------------------------------- the integer artifact

def quant_convs(generator: torch.nn.Module) -> dict:
    return {name: m for name, m in generator.named_modules() if isinstance(m, (QuantConv2d, QuantConvTranspose2d))}


def artifact_dict(generator: Generator) -> dict:
    """The integer artifact of a generator (see the module docstring)."""
    state = {k: v.detach().cpu() for k, v in generator.state_dict().items()}
    quantized = {}
    if generator.bits < 32:
        for name, conv in quant_convs(generator).items():
            weight, scale = state.pop(f"{name}.weight"), state.pop(f"{name}.weight_scale")
            q = weight_to_int(weight, scale, conv.bits, conv.out_dim)
            quantized[f"{name}.weight"] = {"encoding": encoding_for(conv.bits), "bits": conv.bits,
                                           "data": encode_ints(q, conv.bits), "scale": scale.clone(),
                                           "shape": list(weight.shape), "out_dim": conv.out_dim}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model_args": generator.model_args(),
            "quantized": quantized, "float": {k: v.clone() for k, v in state.items()}}


def save_artifact(generator: Generator, path: str) -> int:
    """Write the integer artifact atomically; returns its size in bytes."""
    with atomic_write(path, "wb") as handle:
        torch.save(artifact_dict(generator), handle)
    return os.path.getsize(path)


def generator_from_artifact(artifact: dict) -> Generator:
    """Rebuild the eval-mode Generator: float weights set to q * scale, scales as stored."""
    if not isinstance(artifact, dict) or artifact.get("format") != FORMAT:
        raise ValueError("not an integer generator artifact of this project")
    if artifact["format_version"] > FORMAT_VERSION:
        raise ValueError(f"artifact format version {artifact['format_version']} is newer than this code's")
    generator = Generator(**artifact["model_args"])
    state = dict(artifact["float"])
    for key, entry in artifact["quantized"].items():
        state[key] = dequantize(entry)
        state[key[:-len("weight")] + "weight_scale"] = entry["scale"]
    generator.load_state_dict(state)
    return generator.eval()


def load_artifact(path: str) -> Generator:
    return generator_from_artifact(torch.load(path, map_location="cpu", weights_only=True))


def payload_bytes(generator: Generator) -> int:
    """Bytes of raw tensor data the artifact stores: integer weights at their stored width, the rest as is."""
    total = 0
    convs = quant_convs(generator) if generator.bits < 32 else {}
    packed = {f"{name}.weight" for name in convs}
    for key, value in generator.state_dict().items():
        if key in packed:
            total += (value.numel() * stored_bits(generator.bits) + 7) // 8
        else:
            total += value.numel() * value.element_size()
    return total


# ---------------------------------------------------------------- the exported program

@torch.no_grad()
def folded(generator: Generator) -> Generator:
    """An eval-mode copy with weight quantisation folded in: each conv's weight replaced by its fake-quantised
    value and the conv's weight quantisation switched off (activation quantisation is kept). Same outputs."""
    copy_ = copy.deepcopy(generator).cpu().eval()
    for conv in quant_convs(copy_).values():
        if conv.bits < 32:
            conv.weight.copy_(quantize_weight(conv.weight, conv.weight_scale, conv.bits, conv.out_dim))
            conv.bits = 32
    return copy_


def export_program(generator: Generator, path: str = None, example_batch: int = 2):
    """torch.export of the folded eval-mode generator, batch dimension dynamic; saved to `path` if given."""
    model = folded(generator)
    z, labels = model.sample_inputs(example_batch, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(model, (z, labels), dynamic_shapes={"z": {0: batch}, "labels": {0: batch}})
    if path is not None:
        with atomic_write(path, "wb") as handle:
            torch.export.save(program, handle)
    return program


def load_program(path: str) -> torch.nn.Module:
    """The exported generator as a callable module: module(z, labels) -> images."""
    return torch.export.load(path).module()


@torch.no_grad()
def write_device_artifacts(run_dir: str, generator: Generator, seed: int = 0) -> dict:
    """The integer artifact and the exported program of stages 4 and 5, each reloaded and checked against the
    eval-mode generator on fixed seeded inputs (RuntimeError above DEPLOY_TOLERANCE), and the on-device artifact
    with its runner, checked in ONNX Runtime (`utils.compression.runtime.write_runtime_files`, its own tolerance)."""
    model = copy.deepcopy(generator).cpu().eval()
    artifact_path, program_path = os.path.join(run_dir, ARTIFACT_NAME), os.path.join(run_dir, PROGRAM_NAME)
    artifact_bytes = save_artifact(model, artifact_path)
    export_program(model, program_path)
    z, labels = model.sample_inputs(257, generator=torch.Generator().manual_seed(seed + 1))
    expected = model(z, labels)
    diffs = {name: (load(path)(z, labels) - expected).abs().max().item()
             for name, load, path in (("artifact", load_artifact, artifact_path),
                                      ("program", load_program, program_path))}
    for name, diff in diffs.items():
        if not diff <= DEPLOY_TOLERANCE:
            raise RuntimeError(f"the reloaded {name} differs from the generator it was written from by {diff:.3g}")
    runtime = write_runtime_files(model, run_dir, VerifySettings(seed=seed + 2))
    return {"artifact": ARTIFACT_NAME, "artifact_bytes": artifact_bytes, "program": PROGRAM_NAME,
            "program_bytes": os.path.getsize(program_path), "program_note": PROGRAM_NOTE,
            "max_abs_diff_artifact": diffs["artifact"], "max_abs_diff_program": diffs["program"], **runtime}


# ---------------------------------------------------------------- what ships: cost rows

def like_for_like_rows(teacher: Generator, entries: dict, speed: dict, runtime_names=()) -> dict:
    """Cost rows of the teacher in eager torch (float32 state dict) and as its own float ONNX model in ONNX Runtime
    (`teacher_baseline`: checked against the eager teacher), then of `entries` ({name: (generator, run or None,
    bytes)}; an artifact's run: `runtime_entry`), all timed together in this process, interleaved
    (`utils.compression.cost.timed_rows`). Ratios: to the teacher in the same runtime (SAME_RUNTIME, the headline;
    the rows named in `runtime_names` or ending in RUNTIME_SUFFIX run in ONNX Runtime) and to the eager teacher
    (`vs_teacher`). The ONNX Runtime sessions run on torch's thread count, as the eager models do."""
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as scratch:
        baseline = teacher_baseline(teacher, scratch)
        rows = timed_rows({TEACHER: (teacher, None, state_dict_bytes(teacher)),
                           TEACHER_RUNTIME: (teacher, runtime_forward(baseline["path"], threads), baseline["bytes"]),
                           **entries}, speed)
    rows[TEACHER_RUNTIME]["max_abs_diff_to_eager"] = baseline["max_abs_diff_to_eager"]
    for row in rows.values():
        row["threads"] = threads
    return add_same_runtime_ratios(add_ratios(rows), runtime_names)


def runtime_entry(model: Generator, path: str) -> tuple:
    """A `like_for_like_rows` entry of the artifact at `path` (of `model`), run by ONNX Runtime."""
    return model, runtime_forward(path, torch.get_num_threads()), os.path.getsize(path)


def shipped_cost_rows(teacher: Generator, name: str, model: Generator, run_dir: str, speed: dict,
                      others: dict = None) -> dict:
    """`like_for_like_rows` of what a stage writes: `others` ({name: generator}, eager, state dict bytes), `model`
    in eager torch (weight quantisation folded in; bytes of its integer weight file) and, where `run_dir` has one,
    its `generator.onnx` in ONNX Runtime: what ships."""
    entries = {other_name: (other, None, state_dict_bytes(other)) for other_name, other in (others or {}).items()}
    entries[f"{name} (eager)"] = (model, folded(model), os.path.getsize(os.path.join(run_dir, ARTIFACT_NAME)))
    path = os.path.join(run_dir, RUNTIME_NAME)
    if os.path.isfile(path):
        entries[name + RUNTIME_SUFFIX] = runtime_entry(model, path)
    return like_for_like_rows(teacher, entries, speed)


def shipped_summary(rows: dict, name: str, artifacts: dict) -> str:
    """One line on what ships: ratios to the teacher in the same runtime, then to the eager teacher."""
    if name + RUNTIME_SUFFIX not in rows:
        return f"no on-device artifact: {artifacts.get('runtime_note')}"
    row = rows[name + RUNTIME_SUFFIX]
    like, eager = row[SAME_RUNTIME], row["vs_teacher"]
    return (f"{RUNTIME_NAME} (ONNX Runtime, what ships) against the teacher's float ONNX model in the same runtime: "
            f"{like['bytes']:.4f}x the bytes (1/{1 / like['bytes']:.1f}), latency (b=1) {like['latency_ms']:.3f}x, "
            f"throughput {like['images_per_s']:.2f}x (against the eager teacher: "
            f"{eager['latency_ms']:.3f}x, {eager['images_per_s']:.2f}x); bit for bit equal to its integer reference: "
            f"{'yes' if artifacts.get('runtime_exact') else 'NO'}; |runtime - model| max "
            f"{artifacts['runtime_max_abs_diff']:.3g}, mean {artifacts['runtime_mean_abs_diff']:.2g}")
