"""Probe for what ONNX Runtime does with the generator's graph (benchmarks/results/runtime_choice.md, issue 26):
on one trained compact or private run, in one process, every model timed interleaved (median of repeats):

  graph    the shipped graph (utils/compression/runtime.py) against variants: ONNX Runtime's Tanh kernel instead of
           the rational tanh, block0's sums in float32 instead of float64, the sub-pixel DepthToSpace fused with
           its crop (four QLinearConvs with one-sided pads, no Slice), and with --previous-runtime the graph before
           issue 26 (float32 block0 and to_image, Tanh kernel); each variant's images against the shipped one's
  levels   the graph optimisation level (disabled, basic, extended, all), shipped graph and teacher's ONNX model
  threads  1 and 2 intra-op threads at batch 1 and at batch 256, shipped graph and teacher's ONNX model (each thread
           count in a block of its own)

    git show 9f66de2:utils/compression/runtime.py > /tmp/runtime_prev.py
    /work/runs/cpu_slot .venv/bin/python benchmarks/probes/probe_runtime_options.py --run RUN_DIR \\
        --previous-runtime /tmp/runtime_prev.py --out probe.json
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from unittest import mock

import numpy as np
import onnx
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from utils.compression import runtime  # noqa: E402
from utils.compression.cost import interleaved_seconds  # noqa: E402
from utils.compression.ort_runner import generate, load_session, sample_inputs  # noqa: E402
from utils.compression.reference import reference_images  # noqa: E402
from utils.run.checkpoint import build_generator, lineage, load_checkpoint  # noqa: E402


def ort_tanh(g, x, name="tanh"):
    return g.node("Tanh", [x], "images")


def float32_latent(g, p, name="block0"):
    """runtime._latent with float32 sums, scale and bias."""
    embedded = g.node("Gather", [g.const("embed.weight", p.embed), "labels"], "embedded")
    x = g.node("Concat", ["z", embedded], "latent", axis=1)
    weight = g.node("Cast", [g.int_weight(f"{name}.weight_int", p.ints)], f"{name}.weight", to=onnx.TensorProto.FLOAT)
    y = g.node("MatMul", [x, weight], f"{name}.matmul")
    y = g.node("Reshape", [y, g.const(f"{name}.shape", np.array([-1, len(p.scale), p.side, p.side]))], f"{name}.map")
    y = g.node("Mul", [y, g.channel_vector(f"{name}.scale", p.scale)], f"{name}.scaled")
    y = g.node("Add", [y, g.channel_vector(f"{name}.bias", p.bias)], f"{name}.affine")
    y = g.node("QuantizeLinear", [y, g.const(f"{name}.quant_scale", np.float32(p.quant_scale)),
                                  g.uint8(f"{name}.zero", p.zero)], f"{name}.quantized")
    return runtime._clip_top(g, y, p.top, name)


def fused_subpixel(g, x, p, name):
    """runtime._subpixel without the crop: output block (s, t) of the cropped map is phase (1 - s, 1 - t) of the
    sub-pixel conv, computed by its own QLinearConv with pads on one side only, then one DepthToSpace."""
    out = len(p.scale) // 4
    one = g.const(f"{name}.unit_scale", np.float32(1.0))
    blocks = []
    for s in (0, 1):
        for t in (0, 1):
            r, c = 1 - s, 1 - t
            part = slice((2 * r + c) * out, (2 * r + c + 1) * out)
            tag = f"{name}.p{r}{c}"
            inputs = [x, one, g.uint8(f"{tag}.input_zero", p.input_zero),
                      runtime._offset_weight(g, p.ints[part], p.multipliers[part], tag),
                      g.const(f"{tag}.scale", p.scale[part].astype(np.float32)),
                      g.const(f"{tag}.weight_zero", np.full(out, p.weight_zero, np.uint8)),
                      one, g.uint8(f"{tag}.output_zero", p.output_zero), g.const(f"{tag}.bias", p.bias[part])]
            blocks.append(g.node("QLinearConv", inputs, f"{tag}.phase", kernel_shape=[2, 2],
                                 pads=[r, c, 1 - r, 1 - c]))
    y = runtime._clip_top(g, g.node("Concat", blocks, f"{name}.phases", axis=1), p.top, f"{name}.clipped")
    return g.node("DepthToSpace", [y], name, blocksize=2, mode="DCR")


VARIANTS = {"ONNX Runtime's Tanh kernel": ("_tanh", ort_tanh), "block0 sums in float32": ("_latent", float32_latent),
            "DepthToSpace fused with the crop": ("_subpixel", fused_subpixel)}


def graphs(model, previous: str) -> dict:
    """{name: serialised ONNX model}: the shipped graph, its variants and (with `previous`) the graph before."""
    out = {"shipped": runtime.build_onnx(model).SerializeToString()}
    for name, (function, replacement) in VARIANTS.items():
        with mock.patch.object(runtime, function, replacement):
            out[name] = runtime.build_onnx(model).SerializeToString()
    if previous:
        spec = importlib.util.spec_from_file_location("runtime_previous", previous)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out["previous graph (float32 block0 and to_image, Tanh kernel)"] = module.build_onnx(model).SerializeToString()
    return out


def agreement(model, sessions: dict, n: int = 1024) -> dict:
    """Per graph: pixels that differ from the integer reference, and the largest difference."""
    z, labels = model.sample_inputs(n, generator=torch.Generator().manual_seed(0))
    expected = reference_images(runtime.lower(model), z, labels).numpy()
    result = {}
    for name, session in sessions.items():
        images = generate(session, z.numpy(), labels.numpy())
        result[name] = {"pixels_differing_from_reference": int((images != expected).sum()),
                        "max_abs_diff_to_reference": float(np.abs(images - expected).max()), "pixels": images.size}
    return result


def timings(sessions: dict, latency_repeats: int, throughput_repeats: int, batch: int = 256) -> dict:
    """{name: {"latency_ms", "images_per_s"}}: every session timed interleaved, medians."""
    result = {name: {} for name in sessions}
    for key, n, repeats in (("latency_ms", 1, latency_repeats), ("images_per_s", batch, throughput_repeats)):
        calls = {}
        for name, session in sessions.items():
            inputs = sample_inputs(session, n)
            calls[name] = (lambda s, i: lambda: generate(s, *i))(session, inputs)
        for name, seconds in interleaved_seconds(calls, repeats, desc=f"batch {n}").items():
            median = statistics.median(seconds)
            result[name][key] = 1e3 * median if n == 1 else n / median
    return result


def with_ratios(rows: dict, base: str) -> dict:
    for row in rows.values():
        row["latency_x"] = row["latency_ms"] / rows[base]["latency_ms"]
        row["images_per_s_x"] = row["images_per_s"] / rows[base]["images_per_s"]
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a compact or private run")
    parser.add_argument("--previous-runtime", default=None, help="runtime.py of the graph before issue 26")
    parser.add_argument("--latency-repeats", type=int, default=200)
    parser.add_argument("--throughput-repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="write the results here (.json)")
    return parser.parse_args(argv)


def main(args):
    checkpoint = load_checkpoint(args.run, ("compact", "private"))
    model = build_generator(checkpoint).eval()
    teacher = build_generator(load_checkpoint(lineage(checkpoint)["teacher"], "teacher")).eval()
    report = {"run": checkpoint["run_dir"], "widths": list(model.channels), "bits": model.bits,
              "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as scratch:
        teacher_path = runtime.teacher_baseline(teacher, scratch)["path"]
        built = graphs(model, args.previous_runtime)
        report["bytes"] = {name: len(data) for name, data in built.items()}
        sessions = {name: load_session(data) for name, data in built.items()}
        report["agreement"] = agreement(model, sessions)
        sessions["teacher's ONNX model"] = load_session(teacher_path)
        report["graph"] = with_ratios(timings(sessions, args.latency_repeats, args.throughput_repeats),
                                      "teacher's ONNX model")
        levels = {f"{who}, {level}": load_session(path, 1, level) for level in ("disabled", "basic", "extended", "all")
                  for who, path in (("shipped", built["shipped"]), ("teacher", teacher_path))}
        report["levels"] = timings(levels, args.latency_repeats, args.throughput_repeats)
        report["threads"] = {}
        for n in (1, 2):  # one block per thread count: a 2-thread session's spinning workers would slow the others
            sessions = {f"{who}, {n} thread(s)": load_session(path, n)
                        for who, path in (("shipped", built["shipped"]), ("teacher", teacher_path))}
            report["threads"].update(timings(sessions, args.latency_repeats, args.throughput_repeats))
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)
    return report


if __name__ == "__main__":
    main(parse_args())
