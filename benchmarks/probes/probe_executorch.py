"""Probe for the runtime choice (benchmarks/results/runtime_choice.md): the compact generator lowered to ExecuTorch
(XNNPACK), float and int8 through the PT2E flow, timed beside the float teacher in eager torch, in one process.

Needs its own venv (executorch pulls torchao, coremltools, pandas, scikit-learn), never the project's:

    python3 -m venv /work/venv-et
    /work/venv-et/bin/pip install torch==2.14.1 torchvision==0.29.1 executorch
    OMP_NUM_THREADS=1 PYTHONPATH=. /work/venv-et/bin/python benchmarks/probes/probe_executorch.py --widths 96 48 24

PT2E calibrates its own activation ranges on the float model of the compact widths, so the int8 program is not
our grid (not bit-comparable with the compact model); it is here for size and speed. Batch sizes are static (one
program per batch size): a dynamic batch dimension failed to resize at run time (benchmarks/results/runtime_choice.md,
"ExecuTorch 1.5.1 (XNNPACK): not chosen"; docs/DESIGN.md, "GAN Slimming and compression").
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from models import Generator  # noqa: E402


def lower(model, example, quantize: bool) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    program = torch.export.export(model, example)
    if quantize:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                             get_symmetric_quantization_config)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(program.module(), quantizer)
        for seed in range(8):  # calibration
            prepared(*model.sample_inputs(example[0].shape[0], generator=torch.Generator().manual_seed(seed)))
        program = torch.export.export(convert_pt2e(prepared), example)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    return edge.to_executorch().buffer


def timed(run, inputs, repeats):
    for _ in range(3):
        run(inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_pte(buffers: dict, model, scratch) -> dict:
    """bytes, latency at batch 1 and images/s at batch 256 of the .pte programs (one per batch size)."""
    from executorch.runtime import Runtime
    runtime, row = Runtime.get(), {}
    for batch, buffer in buffers.items():
        path = os.path.join(scratch, f"b{batch}.pte")
        with open(path, "wb") as handle:
            handle.write(buffer)
        method = runtime.load_program(path).load_method("forward")
        inputs = list(model.sample_inputs(batch, generator=torch.Generator().manual_seed(0)))
        seconds = timed(method.execute, inputs, 30 if batch == 1 else 5)
        row["bytes"] = len(buffer)
        row["latency_ms" if batch == 1 else "images_per_s"] = seconds * 1e3 if batch == 1 else batch / seconds
        if batch == 1:
            row["max_abs_diff_vs_eager"] = float((method.execute(inputs)[0] - model(*inputs)).abs().max())
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs=3, default=[96, 48, 24])
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher = Generator(channels=(256, 128, 64), bits=32).eval()
    compact = Generator(channels=args.widths, bits=32).eval()  # float body of the compact widths
    rows = {}
    with torch.no_grad():
        rows["teacher (torch eager)"] = {
            "latency_ms": 1e3 * timed(lambda i: teacher(*i), teacher.sample_inputs(1), 30),
            "images_per_s": 256 / timed(lambda i: teacher(*i), teacher.sample_inputs(256), 5)}
        with tempfile.TemporaryDirectory() as scratch:
            for name, quantize in (("compact float (XNNPACK)", False), ("compact int8 PT2E (XNNPACK)", True)):
                try:
                    buffers = {b: lower(compact, compact.sample_inputs(b), quantize) for b in (1, 256)}
                    rows[name] = measure_pte(buffers, compact, scratch)
                except Exception as exc:  # a failed lowering is a result of the probe
                    rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    print(json.dumps({"widths": args.widths, "threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
