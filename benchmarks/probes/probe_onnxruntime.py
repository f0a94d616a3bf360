"""Probe for the runtime choice (benchmarks/results/runtime_choice.md): compact generators of given widths written
as `generator.onnx` (utils/compression/runtime.py) and run by ONNX Runtime, beside the float teacher in eager torch and
in ONNX Runtime and the compact model in eager torch, all in one process. Random weights: cost does not depend on
them.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probes/probe_onnxruntime.py --widths 96 48 24 --bits 8 4
"""
import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from models import Generator  # noqa: E402
from utils.compression import runtime  # noqa: E402
from utils.compression.cost import measure_speed, state_dict_bytes  # noqa: E402
from utils.compression.deploy import folded, save_artifact  # noqa: E402

SPEED = {"latency_repeats": 30, "throughput_repeats": 5}


def rows_for(widths, bits_list, scratch) -> dict:
    teacher = Generator(channels=(256, 128, 64), bits=32).eval()
    rows = {"teacher (torch eager)": {"bytes": state_dict_bytes(teacher), **measure_speed(teacher, **SPEED)}}
    path = os.path.join(scratch, "teacher.onnx")
    runtime.save_runtime_artifact(teacher, path)
    rows["teacher (ORT float)"] = runtime.runtime_cost(path, speed=SPEED)
    for bits in bits_list:
        compact = Generator(channels=widths, bits=bits).eval()
        name = f"compact {'/'.join(map(str, widths))} {bits}-bit"
        rows[f"{name} (torch eager, generator_int.pt)"] = {
            "bytes": save_artifact(compact, os.path.join(scratch, "g.pt")),
            **measure_speed(compact, run=folded(compact), **SPEED)}
        path = os.path.join(scratch, f"compact{bits}.onnx")
        runtime.save_runtime_artifact(compact, path)
        rows[f"{name} (ORT, generator.onnx)"] = runtime.runtime_cost(path, speed=SPEED)
    base = rows["teacher (torch eager)"]
    for row in rows.values():
        row["vs_teacher"] = {key: row[key] / base[key] for key in ("bytes", "latency_ms", "images_per_s")}
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs=3, default=[96, 48, 24])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        rows = rows_for(args.widths, args.bits, scratch)
    print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
