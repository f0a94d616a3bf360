"""Benchmark: the compact generator against the float teacher, measured in one run on one machine.

Throughput (images/s at batch 256) and latency (ms at batch 1) on the CPU, and the bytes of the integer artifact
against the teacher generator's float32 state dict. Either for a compact run of the pipeline (default: the latest
under --out; its teacher comes from the run's lineage, or a float Generator of --teacher-widths stands in), or for
a synthetic compact model of the given widths (--synthetic-widths: random weights, no pipeline run needed; cost
does not depend on the weights) to see which widths meet the goals:

    artifact bytes <= 1/20 of the teacher's float bytes, throughput >= 4x the teacher's.

Prints a table and writes JSON to benchmarks/results/ (git-ignored).
"""
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from models import QUANT_BITS, Generator  # noqa: E402
from utils.checkpoint import build_generator, latest_run, load_checkpoint  # noqa: E402
from utils.files import write_json  # noqa: E402
from utils.cli import (UserError, add_common_args, make_parser, nonnegative_int, positive_int, quant_bits,  # noqa: E402
                       run_script, set_seed, set_threads)
from utils.cost import measure_speed  # noqa: E402
from utils.deploy import (ARTIFACT_NAME, PROGRAM_NAME, add_ratios, cost_row, export_program, folded,  # noqa: E402
                          format_table, load_program, save_artifact, state_dict_bytes)
from utils.training import maybe_dry_run  # noqa: E402

BYTES_GOAL = 1 / 20  # artifact bytes / teacher float bytes
SPEEDUP_GOAL = 4.0  # compact throughput / teacher throughput


def parse_args(argv=None):
    parser = make_parser(__doc__, "python benchmarks/bench_compression.py                 # latest compact run\n"
                                  "  python benchmarks/bench_compression.py --synthetic-widths 96 48 24 --bits 8")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--compact-dir", default=None, help="compact run (None: <out>/compact/latest)")
    group.add_argument("--synthetic-widths", type=positive_int, nargs=3, default=None, metavar=("C0", "C1", "C2"),
                       help="benchmark a random compact model of these widths instead of a pipeline run")
    group.add_argument("--bits", type=quant_bits, default=QUANT_BITS, help="bit width of the synthetic model")
    group.add_argument("--teacher-widths", type=positive_int, nargs=3, default=[256, 128, 64],
                       help="widths of the float teacher for --synthetic-widths, or when a run's teacher is gone")
    group.add_argument("--nz", type=positive_int, default=100, help="latent dimension of the synthetic models")
    group.add_argument("--latency-repeats", type=positive_int, default=50)
    group.add_argument("--throughput-repeats", type=positive_int, default=10)
    group.add_argument("--throughput-batch", type=positive_int, default=256)
    group.add_argument("--rounds", type=positive_int, default=3,
                       help="timing rounds, each over every model in turn (medians are reported)")
    group.add_argument("--threads", type=nonnegative_int, default=0, help="CPU threads (0: torch's default)")
    group.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    group.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    add_common_args(parser)
    return parser.parse_args(argv)


def synthetic_models(args):
    compact = Generator(nz=args.nz, channels=args.synthetic_widths, bits=args.bits).eval()
    teacher = Generator(nz=args.nz, channels=args.teacher_widths, bits=32).eval()
    return compact, teacher, {"compact": f"synthetic widths {args.synthetic_widths} at {args.bits} bits",
                              "teacher": f"synthetic float widths {args.teacher_widths}"}, None


def run_models(args):
    checkpoint = load_checkpoint(args.compact_dir or latest_run(args.out, "compact"), "compact")
    compact = build_generator(checkpoint).eval()
    source = {"compact": f"compact run {checkpoint['run_dir']}"}
    try:
        if not checkpoint.get("teacher"):
            raise UserError("the compact run names no teacher run")
        teacher_checkpoint = load_checkpoint(checkpoint["teacher"], "teacher")
        teacher = build_generator(teacher_checkpoint).eval()
        source["teacher"] = f"teacher run {teacher_checkpoint['run_dir']}"
    except UserError as exc:
        teacher = Generator(**{**compact.model_args(), "channels": args.teacher_widths, "bits": 32}).eval()
        source["teacher"] = f"float Generator of widths {args.teacher_widths} (teacher run unavailable: {exc})"
    return compact, teacher, source, checkpoint["run_dir"]


def deploy_files(compact, run_dir, scratch):
    """Paths of the integer artifact and exported program: the run's own, or written to `scratch`."""
    paths = {}
    for name, write in ((ARTIFACT_NAME, save_artifact), (PROGRAM_NAME, export_program)):
        path = os.path.join(run_dir, name) if run_dir else None
        if path is None or not os.path.isfile(path):
            path = os.path.join(scratch, name)
            write(compact, path)
        paths[name] = path
    return paths


def measure(args, compact, teacher, paths) -> dict:
    """Cost rows; the timings are medians over `--rounds` rounds that each time every model in turn, so that a
    change of machine load during the run hits all models alike."""
    artifact_bytes = os.path.getsize(paths[ARTIFACT_NAME])
    runs = {"teacher": (teacher, teacher, state_dict_bytes(teacher)),
            "compact (pt2)": (compact, load_program(paths[PROGRAM_NAME]), artifact_bytes),
            "compact (eager)": (compact, folded(compact), artifact_bytes)}
    rows = {name: cost_row(model, size) for name, (model, _, size) in runs.items()}
    speed = {"latency_repeats": args.latency_repeats, "throughput_repeats": args.throughput_repeats,
             "throughput_batch": args.throughput_batch}
    timings = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (model, run, _) in runs.items():
            timings[name].append(measure_speed(model, run=run, **speed))
    for name, samples in timings.items():
        for key in ("latency_ms", "images_per_s"):
            rows[name][key] = statistics.median(sample[key] for sample in samples)
        rows[name]["rounds"] = samples
    return add_ratios(rows)


def goals(rows: dict) -> dict:
    compact = rows["compact (pt2)"]["vs_teacher"]
    result = {"bytes_ratio": compact["bytes"], "bytes_goal": BYTES_GOAL,
              "throughput_ratio": compact["images_per_s"], "throughput_goal": SPEEDUP_GOAL}
    result["bytes_ok"] = result["bytes_ratio"] <= BYTES_GOAL
    result["throughput_ok"] = result["throughput_ratio"] >= SPEEDUP_GOAL
    return result


def main(args):
    if maybe_dry_run(args):
        return None
    set_seed(args.seed)
    set_threads(args.threads)
    compact, teacher, source, run_dir = synthetic_models(args) if args.synthetic_widths else run_models(args)
    with tempfile.TemporaryDirectory() as scratch:
        paths = deploy_files(compact, run_dir, scratch)
        rows = measure(args, compact, teacher, paths)
        program_bytes = os.path.getsize(paths[PROGRAM_NAME])
    result = {"source": source, "compact_widths": list(compact.channels), "bits": compact.bits,
              "teacher_widths": list(teacher.channels), "cost": rows, "goals": goals(rows),
              "program_bytes": program_bytes, "threads": torch.get_num_threads(),
              "throughput_batch": args.throughput_batch, "machine": platform.platform(),
              "processor": platform.processor() or platform.machine(), "torch": torch.__version__}
    print(f"teacher: {source['teacher']}\ncompact: {source['compact']}")
    print(format_table(rows))
    g = result["goals"]
    print(f"artifact / teacher float bytes = {g['bytes_ratio']:.4f} (goal <= {BYTES_GOAL:.3f}: "
          f"{'met' if g['bytes_ok'] else 'MISSED'}); throughput = {g['throughput_ratio']:.2f}x the teacher "
          f"(goal >= {SPEEDUP_GOAL:g}x: {'met' if g['throughput_ok'] else 'MISSED'})")
    os.makedirs(args.results_dir, exist_ok=True)
    tag = "synthetic-{}-{}-{}".format(*compact.channels) if args.synthetic_widths else "run"
    path = os.path.join(args.results_dir, f"compression-{tag}-{compact.bits}bit-{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json(path, result)
    print(f"results: {path}")
    if args.check and not (g["bytes_ok"] and g["throughput_ok"]):
        raise SystemExit(1)
    return path


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
