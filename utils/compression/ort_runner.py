"""Runs the generator's ONNX artifact with ONNX Runtime and numpy only: what a device needs, no torch, no code of
this project (the file is self-contained: copy it beside `generator.onnx`).

    python ort_runner.py generator.onnx --num-samples 16 --out images.npy      # images in [-1, 1], (N, C, H, W)
    python ort_runner.py generator.onnx --inputs zy.npz --out images.npy       # given z (N, nz), labels (N,)
    python ort_runner.py generator.onnx --bench                                # latency b=1, throughput b=256

Prints one JSON line describing what it did. Timings are medians over repeats after a warm-up.
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


OPTIMIZATION = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}


def load_session(path, threads: int = 1, optimization: str = "all") -> ort.InferenceSession:
    """An ONNX Runtime CPU session (of a file or serialised model) on `threads` threads, with every graph
    optimisation on by default (QLinear fusions, constant folding; measured best: runtime_choice.md)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = OPTIMIZATION[optimization]
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def metadata(session: ort.InferenceSession) -> dict:
    return dict(session.get_modelmeta().custom_metadata_map)


def sample_inputs(session: ort.InferenceSession, n: int, seed: int = 0):
    """n standard-normal latent vectors and class-balanced labels (0, 1, ..., C-1, 0, ...)."""
    info = metadata(session)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, int(info["nz"]))).astype(np.float32)
    labels = np.arange(n, dtype=np.int64) % int(info["num_classes"])
    return z, labels


def generate(session: ort.InferenceSession, z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return session.run(None, {"z": np.ascontiguousarray(z, np.float32),
                              "labels": np.ascontiguousarray(labels, np.int64)})[0]


def time_forward(session, z, labels, repeats: int, warmup: int = 3) -> float:
    """Median seconds of one `generate` call over `repeats` calls."""
    for _ in range(warmup):
        generate(session, z, labels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(session, z, labels)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_speed(session, latency_repeats: int = 50, throughput_repeats: int = 10,
                  throughput_batch: int = 256) -> dict:
    """Latency (ms, batch 1) and throughput (images/s at batch `throughput_batch`)."""
    latency = time_forward(session, *sample_inputs(session, 1), latency_repeats)
    batch_time = time_forward(session, *sample_inputs(session, throughput_batch), throughput_repeats)
    return {"latency_ms": latency * 1e3, "images_per_s": throughput_batch / batch_time}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="generator.onnx")
    parser.add_argument("--inputs", help=".npz with z (N, nz) float32 and labels (N,) int64")
    parser.add_argument("--num-samples", type=int, default=16, help="without --inputs: this many seeded samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the images here (.npy)")
    parser.add_argument("--bench", action="store_true", help="measure latency at batch 1 and throughput")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--optimization", choices=OPTIMIZATION, default="all", help="graph optimisation level")
    return parser.parse_args(argv)


def main(args) -> dict:
    session = load_session(args.model, args.threads, args.optimization)
    if args.inputs:
        with np.load(args.inputs) as data:
            z, labels = data["z"], data["labels"]
    else:
        z, labels = sample_inputs(session, args.num_samples, args.seed)
    images = generate(session, z, labels)
    report = {"model": args.model, "images_shape": list(images.shape), "min": float(images.min()),
              "max": float(images.max()), "metadata": metadata(session), "onnxruntime": ort.__version__}
    if args.out:
        np.save(args.out, images)
        report["out"] = args.out
    if args.bench:
        report.update(measure_speed(session))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
