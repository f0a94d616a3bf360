"""Benchmark: the compact generator against the float teacher, measured in one run on one machine.

Throughput (images/s at batch 256) and latency (ms at batch 1) on the CPU, and bytes on disk, of what ships: the
on-device artifact `generator.onnx` run by ONNX Runtime (utils/compression/runtime.py), beside the compact model in
eager torch (bytes: the integer artifact `generator_int.pt`) and `generator.pt2` (a float debugging export: its weights
are stored as floats), against the teacher generator in eager torch (float32 state dict) and as its own float ONNX
model in the same ONNX Runtime, all timed in this process, interleaved, on the same threads. The headline ratios are
like for like (utils/compression/cost.py, SAME_RUNTIME): generator.onnx against the teacher's ONNX model. Either for
a compact (or private) run of the pipeline (default: the latest compact run under --out; its teacher comes from the
run's lineage, or a float Generator of --teacher-widths stands in), or for a synthetic compact model of the given
widths (--synthetic-widths: random weights, no pipeline run needed; cost does not depend on the weights) to see
which widths meet the goals (issue 26's targets for the default artifact, against the teacher in the same runtime):

    bytes <= 1/25, latency at batch 1 <= 0.15x, throughput at batch 256 >= 8x.

Prints a table and writes JSON to benchmarks/results/ (git-ignored).

`--sweep` trades cost against quality: from one teacher and one distillation set it trains and compresses a student
for every rho x bits x penalty (uniform or cost-weighted L1) point, evaluates the samples (FD, downstream accuracy:
evaluate.py), times every point's generator.onnx beside the teacher's ONNX model (and the eager teacher) in this
process, interleaved, and writes the Pareto table (.md), plot (.png) and data (.json), with the ratios to the teacher in
the same runtime first, to benchmarks/results/sweep-<time>.*. Hours at the default settings.
"""
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from models import QUANT_BITS, Generator  # noqa: E402
from utils.compression.cost import SAME_RUNTIME, TEACHER, TEACHER_RUNTIME, format_table  # noqa: E402
from utils.compression.deploy import (ARTIFACT_NAME, PROGRAM_NAME, export_program, folded,  # noqa: E402
                                      like_for_like_rows, load_program, runtime_entry, save_artifact)
from utils.compression.runtime import RUNTIME_NAME, save_runtime_artifact  # noqa: E402
from utils.compression.slimming import PENALTIES  # noqa: E402
from utils.evaluation.metrics import QUICK_PROTOCOL  # noqa: E402
from utils.run.checkpoint import build_generator, latest_run, lineage, load_checkpoint  # noqa: E402
from utils.run.cli import (UserError, add_common_args, make_parser, nonnegative_float, nonnegative_int,  # noqa: E402
                           positive_int, quant_bits, run_script, set_seed, set_threads)
from utils.run.files import write_json  # noqa: E402
from utils.run.lifecycle import maybe_dry_run  # noqa: E402

# issue 26's targets for the default artifact, as ratios to the teacher's float ONNX model in the same runtime
GOALS = {"bytes": ("<=", 1 / 25), "latency_ms": ("<=", 0.15), "images_per_s": (">=", 8.0)}


def parse_args(argv=None):
    parser = make_parser(__doc__, "python benchmarks/bench_compression.py                 # latest compact run\n"
                                  "  python benchmarks/bench_compression.py --synthetic-widths 96 48 24 --bits 8")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--compact-dir", default=None,
                       help="compact or private run with a generator.onnx (None: <out>/compact/latest)")
    group.add_argument("--synthetic-widths", type=positive_int, nargs=3, default=None, metavar=("C0", "C1", "C2"),
                       help="benchmark a random compact model of these widths instead of a pipeline run")
    group.add_argument("--bits", type=quant_bits, default=QUANT_BITS, help="bit width of the synthetic model")
    group.add_argument("--teacher-widths", type=positive_int, nargs=3, default=[256, 128, 64],
                       help="widths of the float teacher for --synthetic-widths, or when a run's teacher is gone")
    group.add_argument("--nz", type=positive_int, default=100, help="latent dimension of the synthetic models")
    group.add_argument("--latency-repeats", type=positive_int, default=50)
    group.add_argument("--throughput-repeats", type=positive_int, default=10)
    group.add_argument("--throughput-batch", type=positive_int, default=256)
    group.add_argument("--threads", type=nonnegative_int, default=0, help="CPU threads (0: torch's default)")
    group.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    group.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    add_sweep_args(parser)
    add_common_args(parser)
    return parser.parse_args(argv)


def add_sweep_args(parser):
    group = parser.add_argument_group("sweep (--sweep: train, compress, evaluate and time every point; hours)")
    group.add_argument("--sweep", action="store_true", help="run the rho x bits x penalty sweep")
    group.add_argument("--teacher-dir", default=None, help="the sweep's teacher (None: <out>/teacher/latest)")
    group.add_argument("--distill-dir", default=None, help="its distillation set (None: <out>/distill/latest)")
    group.add_argument("--rhos", type=nonnegative_float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    group.add_argument("--sweep-bits", type=quant_bits, nargs="+", default=[8, 4])
    group.add_argument("--penalties", choices=PENALTIES, nargs="+", default=list(SWEPT_PENALTIES))
    group.add_argument("--student-steps", type=positive_int, default=300, help="student steps per point")
    group.add_argument("--student-batch-size", type=positive_int, default=64)
    group.add_argument("--num-fd-samples", type=positive_int, default=2000)
    # defaults: evaluate.py --quick's, so the sweep's numbers compare with make pipeline's
    group.add_argument("--num-downstream-samples", type=positive_int, default=QUICK_PROTOCOL.num_samples)
    group.add_argument("--classifier-epochs", type=positive_int, default=1)
    group.add_argument("--data-root", default=None, help="passed to evaluate.py (None: its default)")
    group.add_argument("--public-size", type=positive_int, default=None, help="passed to evaluate.py")
    group.add_argument("--audit-samples", type=positive_int, default=None, help="passed to evaluate.py")
    group.add_argument("--audit-members", type=positive_int, default=None, help="passed to evaluate.py")
    group.add_argument("--sweep-out", default=None, help="root of the sweep's runs (None: <out>/sweep)")
    group.add_argument("--reuse", action="store_true",
                       help="reuse each point's finished student and compact runs already under --sweep-out (their "
                            "settings must match), training only what is missing: continues an interrupted sweep")


def synthetic_models(args):
    compact = Generator(nz=args.nz, channels=args.synthetic_widths, bits=args.bits).eval()
    teacher = Generator(nz=args.nz, channels=args.teacher_widths, bits=32).eval()
    return compact, teacher, {"compact": f"synthetic widths {args.synthetic_widths} at {args.bits} bits",
                              "teacher": f"synthetic float widths {args.teacher_widths}"}, None


def run_models(args):
    checkpoint = load_checkpoint(args.compact_dir or latest_run(args.out, "compact"), ("compact", "private"))
    compact = build_generator(checkpoint).eval()
    source = {"compact": f"{checkpoint['stage']} run {checkpoint['run_dir']}"}
    try:
        teacher_dir = lineage(checkpoint)["teacher"]
        if not teacher_dir:
            raise UserError(f"the {checkpoint['stage']} run names no teacher run")
        teacher_checkpoint = load_checkpoint(teacher_dir, "teacher")
        teacher = build_generator(teacher_checkpoint).eval()
        source["teacher"] = f"teacher run {teacher_checkpoint['run_dir']}"
    except UserError as exc:
        teacher = Generator(**{**compact.model_args(), "channels": args.teacher_widths, "bits": 32}).eval()
        source["teacher"] = f"float Generator of widths {args.teacher_widths} (teacher run unavailable: {exc})"
    return compact, teacher, source, checkpoint["run_dir"]


def deploy_files(compact, run_dir, scratch):
    """Paths of the integer artifact, exported program and runtime artifact: the run's own, or written to
    `scratch`."""
    paths = {}
    for name, write in ((ARTIFACT_NAME, save_artifact), (PROGRAM_NAME, export_program),
                        (RUNTIME_NAME, save_runtime_artifact)):
        path = os.path.join(run_dir, name) if run_dir else None
        if path is None or not os.path.isfile(path):
            path = os.path.join(scratch, name)
            write(compact, path)
        paths[name] = path
    return paths


def speed_settings(args) -> dict:
    return {"latency_repeats": args.latency_repeats, "throughput_repeats": args.throughput_repeats,
            "throughput_batch": args.throughput_batch}


def measure(args, compact, teacher, paths) -> dict:
    """Like-for-like cost rows (`like_for_like_rows`): the teacher in eager torch and as its ONNX model, the
    compact model as generator.onnx, in eager torch and as the exported program, timed together, interleaved."""
    entries = {"compact (ONNX Runtime)": runtime_entry(compact, paths[RUNTIME_NAME]),
               "compact (eager)": (compact, folded(compact), os.path.getsize(paths[ARTIFACT_NAME])),
               "compact (pt2, float debug export)": (compact, load_program(paths[PROGRAM_NAME]),
                                                     os.path.getsize(paths[PROGRAM_NAME]))}
    return like_for_like_rows(teacher, entries, speed_settings(args))


def goals(rows: dict) -> dict:
    """generator.onnx against GOALS, as ratios to the teacher's ONNX model in the same runtime."""
    ratios = rows["compact (ONNX Runtime)"][SAME_RUNTIME]
    result = {}
    for key, (sense, goal) in GOALS.items():
        met = ratios[key] <= goal if sense == "<=" else ratios[key] >= goal
        result[key] = {"ratio": ratios[key], "goal": f"{sense} {goal:g}", "met": met}
    return result


# ---------------------------------------------------------------- the rho x bits x penalty sweep

SWEPT_PENALTIES = ("uniform", "cost")  # by default; --penalties params adds the bytes-weighted one
# the Pareto objectives of the sweep: +1 where larger is better
OBJECTIVES = {"bytes": -1, "latency_ms": -1, "images_per_s": +1, "fd": -1, "downstream_accuracy": +1}
# targets of a front point (issue 26), as ratios to the teacher's ONNX model in the same runtime: bytes <= 1/50 and
# throughput >= 15x, downstream accuracy within 2 points of the teacher's, FD at most 1.25x the teacher's
TARGETS = {"bytes_ratio": 1 / 50, "throughput_ratio": 15.0, "accuracy_drop": 0.02, "fd_ratio": 1.25}


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    rho: float
    bits: int
    penalty: str

    @property
    def name(self) -> str:
        return f"rho{self.rho:g}-{self.bits}bit-{self.penalty}"


def sweep_points(args) -> list:
    return [SweepPoint(rho, bits, penalty) for rho in args.rhos for bits in args.sweep_bits
            for penalty in args.penalties]


def student_argv(args, point: SweepPoint) -> list:
    return ["--teacher-dir", args.teacher_dir, "--distill-dir", args.distill_dir, "--rho", f"{point.rho:g}",
            "--quant-bits", str(point.bits), "--penalty", point.penalty, "--batch-size", str(args.student_batch_size),
            "--max-steps", str(args.student_steps)]


def same_setting(saved, wanted) -> bool:
    """A run's saved setting is the wanted one; paths compare as the runs they name (the stage saves the run a
    `latest` link pointed at, while the sweep may be given the link)."""
    if isinstance(saved, str) and isinstance(wanted, str) and os.path.exists(saved) and os.path.exists(wanted):
        return os.path.realpath(saved) == os.path.realpath(wanted)
    return saved == wanted


def finished_run(root: str, stage: str, point: SweepPoint, expected: dict, done_file: str):
    """With --reuse: the newest run of this point under root/stage that finished (`done_file` written) with the
    `expected` settings; None when there is none. A finished run with other settings is refused, not mixed in."""
    stage_dir = os.path.join(root, stage)
    names = sorted(os.listdir(stage_dir)) if os.path.isdir(stage_dir) else []
    for name in reversed([n for n in names if n.endswith("-" + point.name)]):
        run_dir = os.path.join(stage_dir, name)
        if not os.path.isfile(os.path.join(run_dir, done_file)):
            continue  # interrupted: trained again
        with open(os.path.join(run_dir, "args.json")) as handle:
            settings = json.load(handle)
        wrong = {key: settings.get(key) for key, value in expected.items()
                 if not same_setting(settings.get(key), value)}
        if wrong:
            raise UserError(f"--reuse: {run_dir} has other settings ({wrong}, expected {expected}); "
                            "use another --sweep-out")
        return run_dir
    return None


def train_point(args, point: SweepPoint, root: str) -> str:
    """One point's student (from the sweep's teacher and distillation set), compressed: its compact run. With
    --reuse, finished runs of the point are taken as they are."""
    import compress_student
    import train_student
    common = ["--out", root, "--seed", str(args.seed), "--device", "cpu", "--desc", point.name]
    student_settings = {"rho": point.rho, "quant_bits": point.bits, "penalty": point.penalty, "seed": args.seed,
                        "max_steps": args.student_steps, "batch_size": args.student_batch_size,
                        "teacher_dir": args.teacher_dir, "distill_dir": args.distill_dir}
    student = args.reuse and finished_run(root, "student", point, student_settings, "summary.json")
    if not student:
        student = train_student.main(train_student.parse_args([*common, *student_argv(args, point)]))
    compact = args.reuse and finished_run(root, "compact", point, {"student_dir": student}, "checkpoint.pt")
    return compact or compress_student.main(compress_student.parse_args(
        [*common, "--student-dir", student, "--check-samples", "256", "--latency-repeats", "1",
         "--throughput-repeats", "1", "--throughput-batch", "8"]))


def evaluate_runs(args, runs: list, root: str) -> dict:
    """evaluate.py's rows (FD, downstream accuracy, ...) of `runs`, keyed by run directory."""
    import evaluate
    argv = ["--out", root, "--seed", str(args.seed), "--device", "cpu", "--runs", *runs, "--quick",
            "--num-fd-samples", str(args.num_fd_samples), "--num-downstream-samples",
            str(args.num_downstream_samples), "--classifier-epochs", str(args.classifier_epochs),
            "--latency-repeats", "1", "--throughput-repeats", "1", "--artifact-downstream"]
    for flag in ("data_root", "public_size", "audit_samples", "audit_members", "max_steps"):
        if getattr(args, flag) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    eval_dir = evaluate.main(evaluate.parse_args(argv))
    with open(os.path.join(eval_dir, "results.json")) as handle:
        rows = json.load(handle)["rows"]
    return {os.path.realpath(row["run_dir"]): row for row in rows}


def sweep_costs(args, teacher, compacts: dict, scratch: str) -> dict:
    """Like-for-like cost rows in this process (`like_for_like_rows`): the teacher in eager torch and as its ONNX
    model, and every point's generator.onnx in ONNX Runtime, timed together, interleaved."""
    entries = {name: runtime_entry(model, deploy_files(model, run_dir, scratch)[RUNTIME_NAME])
               for name, (model, run_dir) in compacts.items()}
    return like_for_like_rows(teacher, entries, speed_settings(args), runtime_names=entries)


def pareto_flags(rows: list) -> list:
    """For each row, whether no other row is at least as good in every objective and better in one."""
    def dominates(a, b):
        better = [sign * (a[key] - b[key]) for key, sign in OBJECTIVES.items()]
        return all(d >= 0 for d in better) and any(d > 0 for d in better)
    return [not any(dominates(other, row) for other in rows if other is not row) for row in rows]


def sweep_rows(points, compacts: dict, costs: dict, quality: dict, teacher_row: dict) -> list:
    """One row per point: cost of its runtime artifact (ratios to the teacher in the same runtime, and to the
    eager teacher) and quality of its samples."""
    rows = []
    for point in points:
        model, run_dir = compacts[point.name]
        q = quality[os.path.realpath(run_dir)]
        rows.append({"point": point.name, "rho": point.rho, "bits": point.bits, "penalty": point.penalty,
                     "widths": list(model.channels), "run_dir": run_dir, **costs[point.name],
                     "fd": q["fd_runtime"], "downstream_accuracy": q["downstream_accuracy_runtime"],
                     "fd_ratio": q["fd_runtime"] / teacher_row["fd"],
                     "accuracy_drop": teacher_row["downstream_accuracy"] - q["downstream_accuracy_runtime"]})
    for row, front in zip(rows, pareto_flags(rows)):
        row["pareto"] = front
        ratios = row[SAME_RUNTIME]
        row["meets_targets"] = (front and ratios["bytes"] <= TARGETS["bytes_ratio"]
                                and ratios["images_per_s"] >= TARGETS["throughput_ratio"]
                                and row["accuracy_drop"] <= TARGETS["accuracy_drop"]
                                and row["fd_ratio"] <= TARGETS["fd_ratio"])
    return rows


def sweep_markdown(rows: list, teacher_row: dict, costs: dict) -> str:
    header = ["point", "widths", "bytes", "bytes xT", "ms (b=1)", "latency xT", "img/s (b=256)", "img/s xT",
              "latency xT eager", "img/s xT eager", "FD", "FD xT", "downstream acc", "acc - T (points)", "Pareto",
              "targets"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in sorted(rows, key=lambda r: r["bytes"]):
        ratios, eager = row[SAME_RUNTIME], row["vs_teacher"]
        cells = [row["point"], "/".join(map(str, row["widths"])), f"{row['bytes']:,}", f"{ratios['bytes']:.4f}",
                 f"{row['latency_ms']:.3f}", f"{ratios['latency_ms']:.3f}", f"{row['images_per_s']:.0f}",
                 f"{ratios['images_per_s']:.2f}", f"{eager['latency_ms']:.3f}", f"{eager['images_per_s']:.2f}",
                 f"{row['fd']:.2f}", f"{row['fd_ratio']:.2f}",
                 f"{100 * row['downstream_accuracy']:.1f} %", f"{-100 * row['accuracy_drop']:+.1f}",
                 "yes" if row["pareto"] else "", "met" if row["meets_targets"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    t, tr = costs[TEACHER], costs[TEACHER_RUNTIME]
    lines += ["", f"Teacher: its float ONNX model {tr['bytes']:,} bytes, {tr['latency_ms']:.3f} ms (b=1), "
              f"{tr['images_per_s']:.0f} img/s in ONNX Runtime; in eager torch {t['latency_ms']:.3f} ms, "
              f"{t['images_per_s']:.0f} img/s ({t['bytes']:,} bytes of float32 state dict); FD {teacher_row['fd']:.2f}"
              f", downstream accuracy {100 * teacher_row['downstream_accuracy']:.1f} %. Bytes, latency and "
              f"throughput: each point's generator.onnx in ONNX Runtime, timed in one process with the teacher's "
              f"ONNX model and the eager teacher, interleaved, {t['threads']} thread(s). xT: ratio to the teacher's "
              f"ONNX model in the same runtime (like for like); xT eager: to the teacher in eager torch.",
              f"Targets (all of them, on the front): bytes <= {TARGETS['bytes_ratio']:.3f}x, img/s >= "
              f"{TARGETS['throughput_ratio']:g}x, downstream accuracy within {100 * TARGETS['accuracy_drop']:g} "
              f"points, FD <= {TARGETS['fd_ratio']:g}x."]
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list, teacher_row: dict, path: str):
    """Bytes ratio (log) against FD (log) and against downstream accuracy; colour = bits, marker = penalty, black edge
    = on the Pareto front, label = throughput ratio."""
    from matplotlib.ticker import NullFormatter

    from utils.evaluation.plots import plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colours = {bits: f"C{i}" for i, bits in enumerate(sorted({row["bits"] for row in rows}))}
    for ax, key, label in ((axes[0], "fd", "FD (lower is better)"),
                           (axes[1], "downstream_accuracy", "downstream accuracy")):
        for row in rows:
            x = row[SAME_RUNTIME]["bytes"]
            ax.scatter(x, row[key], c=colours[row["bits"]], marker="o" if row["penalty"] == "uniform" else "^",
                       edgecolors="black" if row["pareto"] else "none", s=60,
                       label=f"{row['bits']}-bit, {row['penalty']}")
            ax.annotate(f"{row[SAME_RUNTIME]['images_per_s']:.1f}x", (x, row[key]), fontsize=7)
        ax.axhline(teacher_row[key], color="grey", linestyle="--", label="teacher")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # the minor labels of a log axis overlap
        if key == "fd":
            ax.set_yscale("log")  # a collapsed point's FD (hundreds) would flatten the rest
        ax.set_xlabel("generator.onnx bytes / teacher's ONNX model bytes")
        ax.set_ylabel(label)
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes[0].legend(unique.values(), unique.keys(), fontsize=7)
    fig.suptitle("rho x bits x penalty (labels: throughput vs the teacher in ONNX Runtime; black edge: Pareto "
                 "front)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(args) -> str:
    """Train and compress every point, evaluate them with the teacher, time them in this process, and write the
    Pareto table (.md), plot (.png) and data (.json) to --results-dir; returns the .json path."""
    args.teacher_dir = args.teacher_dir or latest_run(args.out, "teacher")
    args.distill_dir = args.distill_dir or latest_run(args.out, "distill")
    root = args.sweep_out or os.path.join(args.out, "sweep")
    points = sweep_points(args)
    compact_runs = {point.name: train_point(args, point, root) for point in points}
    compacts = {name: (build_generator(load_checkpoint(run, "compact")).eval(), run)
                for name, run in compact_runs.items()}
    quality = evaluate_runs(args, [args.teacher_dir, *compact_runs.values()], root)
    teacher = build_generator(load_checkpoint(args.teacher_dir, "teacher")).eval()
    with tempfile.TemporaryDirectory() as scratch:
        costs = sweep_costs(args, teacher, compacts, scratch)
    teacher_row = quality[os.path.realpath(load_checkpoint(args.teacher_dir, "teacher")["run_dir"])]
    rows = sweep_rows(points, compacts, costs, quality, teacher_row)
    stem = os.path.join(args.results_dir, f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(args.results_dir, exist_ok=True)
    table = sweep_markdown(rows, teacher_row, costs)
    with open(stem + ".md", "w") as handle:
        handle.write(table)
    plot_sweep(rows, teacher_row, stem + ".png")
    write_json(stem + ".json", {"points": rows, "teacher": {**costs[TEACHER], "fd": teacher_row["fd"],
                                "downstream_accuracy": teacher_row["downstream_accuracy"]},
                                "teacher_runtime": costs[TEACHER_RUNTIME], "targets": TARGETS,
                                "settings": {key: value for key, value in vars(args).items()},
                                "threads": torch.get_num_threads(), "machine": platform.platform()})
    print(table + f"results: {stem}.md / .png / .json")
    return stem + ".json"


def main(args):
    if maybe_dry_run(args):
        return None
    set_seed(args.seed)
    set_threads(args.threads)
    if args.sweep:
        return run_sweep(args)
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
    print(f"{RUNTIME_NAME} against the teacher's ONNX model in the same runtime: " + "; ".join(
        f"{key} {goal['ratio']:.4g}x (goal {goal['goal']}: {'met' if goal['met'] else 'MISSED'})"
        for key, goal in result["goals"].items()))
    os.makedirs(args.results_dir, exist_ok=True)
    tag = "synthetic-{}-{}-{}".format(*compact.channels) if args.synthetic_widths else "run"
    path = os.path.join(args.results_dir, f"compression-{tag}-{compact.bits}bit-{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json(path, result)
    print(f"results: {path}")
    if args.check and not all(goal["met"] for goal in result["goals"].values()):
        raise SystemExit(1)
    return path


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
