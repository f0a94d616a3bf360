"""Stage 4: compress the GAN Slimming student into the compact generator and its device artifacts.

Removes every channel whose output is exactly 0 (BatchNorm gamma exactly 0 and beta <= 0: the student's dead
channels), keeping the student's bit width and its stored per-channel weight scales, and checks on fixed seeded
inputs that the compact generator computes the same images as the student in eval mode (refused, nothing
written, if the largest difference exceeds 1e-5; measured in float32, and again in float64 where float32's
summation order moves an activation across a quantisation level: utils/compression/compress.py). Post-processing of the
student: the privacy ledger is copied unchanged.

Writes `<out>/compact/<NNNNN>-<desc>/`: checkpoint.pt (stage "compact"), generator.onnx (the on-device artifact:
ONNX Runtime, integer weights inside, checked on seeded inputs to equal its eager integer reference bit for bit and,
as a second guard, to agree with the compact model; utils/compression/runtime.py) with ort_runner.py (runs it with
onnxruntime and numpy only), generator_int.pt (integer weights: int8, or packed int4 for <= 4 bits, plus float
scales; torch.load(weights_only=True)), generator.pt2 (a float debugging export: torch.export, weights stored as
floats), compression.json / compression.png (parameters, MACs, bytes, CPU latency at batch 1 and throughput at batch
256 of the teacher in eager torch and as its own float ONNX model in ONNX Runtime (checked to compute the eager
teacher), of the student and the compact model in eager torch and of generator.onnx in ONNX Runtime, all timed in
one process, interleaved, on the same threads; each row with two sets of ratios: to the teacher in its own runtime,
`vs_teacher_same_runtime`, the like-for-like headline (generator.onnx against the teacher's ONNX model), and to the
eager teacher, `vs_teacher`; utils/compression/deploy.py, cost.py), samples.png (student vs compact). Runs on the
CPU.
"""
import copy
import os

import torch

from models import Generator
from utils.compression.compress import MAX_ABS_DIFF, checked_difference, compress, summary
from utils.compression.cost import format_table
from utils.compression.deploy import ARTIFACT_NAME, shipped_cost_rows, shipped_summary, write_device_artifacts
from utils.compression.runtime import RUNTIME_NAME
from utils.evaluation.plots import plot_cost_bars, side_by_side_samples
from utils.privacy.ledger import describe, inherit, warn_if_not_private
from utils.run.checkpoint import build_generator, checkpoint_fields, input_run, latest_run, lineage, load_checkpoint
from utils.run.cli import (UserError, add_common_args, add_input_arg, add_speed_args, make_parser, positive_int,
                           resolve_device, run_script, set_seed, set_threads, speed_settings)
from utils.run.files import write_json
from utils.run.lifecycle import Run, maybe_dry_run, skip_if_done

STAGE = "compact"
# The student this stage compresses, editable here: None means <out>/student/latest; --student-dir overrides it.
STUDENT_DIR = None


def parse_args(argv=None):
    parser = make_parser(__doc__, "python compress_student.py                      # <out>/student/latest\n"
                                  "  python compress_student.py --student-dir checkpoints/student/00003-slim")
    group = parser.add_argument_group("compression")
    add_input_arg(group, "--student-dir", "STUDENT_DIR", "student run directory, `latest` link or checkpoint file",
                  "<out>/student/latest")
    group.add_argument("--check-samples", type=positive_int, default=4096,
                       help="fixed (z, label) pairs on which compact must equal student")
    add_speed_args(parser)
    add_common_args(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- inputs

def load_student(args) -> dict:
    path = input_run(args.student_dir, STUDENT_DIR, args.out, "student")
    if path == latest_run(args.out, "student") and not os.path.exists(path):
        raise UserError(f"{path}: no student run under --out {args.out} (run train_student.py first, "
                        f"or pass --student-dir)")
    return load_checkpoint(path, "student")


def find_teacher(student_checkpoint: dict, student):
    """(teacher generator, source description, teacher run dir or None): the student's teacher (`lineage`). Falls
    back to a float Generator with the student's full widths when no teacher run can be loaded (its cost numbers
    are then the same)."""
    path = lineage(student_checkpoint)["teacher"]
    try:
        if path is None:
            raise UserError("the student checkpoint names no teacher run")
        checkpoint = load_checkpoint(path, "teacher")
        return build_generator(checkpoint).eval(), f"teacher run {checkpoint['run_dir']}", checkpoint["run_dir"]
    except UserError as exc:
        fallback = Generator(**{**student.model_args(), "bits": 32}).eval()
        return fallback, (f"no teacher run found ({exc}): a float Generator with the student's full widths "
                          f"{list(student.channels)} stands in for it"), None


# ---------------------------------------------------------------- compression

def compress_checked(student, args):
    """(compact, {max_abs_diff, check_precision}): refuses (UserError, before anything is written) above
    MAX_ABS_DIFF (`utils.compression.compress.checked_difference`: measured in float32, else in float64)."""
    compact = compress(student)
    diff, precision = checked_difference(student, compact, args.check_samples, seed=args.seed)
    if not diff <= MAX_ABS_DIFF:
        raise UserError(f"the compact generator differs from the student by {diff:.3g} (> {MAX_ABS_DIFF:g}) on "
                        f"{args.check_samples} fixed inputs in {precision}: refused, nothing written")
    return compact, {"max_abs_diff": diff, "check_precision": precision}


# ---------------------------------------------------------------- report

def cost_report(args, models: dict, run_dir: str) -> dict:
    """Cost rows, one process, interleaved, ratios to the teacher in the row's own runtime and to the eager teacher
    (`utils.compression.deploy.shipped_cost_rows`)."""
    set_threads(args.threads)
    return shipped_cost_rows(models["teacher"], "compact", models["compact"], run_dir, speed_settings(args),
                             others={"student": models["student"]})


def make_checkpoint(args, student_checkpoint, compact, compression, teacher_dir) -> dict:
    """The common fields, the student's discriminator where it has one (stage 5 fine-tunes it), the teacher
    (for cost ratios) and the compression report."""
    checkpoint = checkpoint_fields(STAGE, args, parent=student_checkpoint["run_dir"], models={"generator": compact},
                                   ledger=inherit(student_checkpoint["privacy"]),
                                   data=copy.deepcopy(student_checkpoint.get("data")))
    checkpoint.update(teacher=teacher_dir, compression=compression)
    if "discriminator" in student_checkpoint and "discriminator" in student_checkpoint["model_args"]:
        checkpoint["discriminator"] = student_checkpoint["discriminator"]
        checkpoint["model_args"]["discriminator"] = copy.deepcopy(student_checkpoint["model_args"]["discriminator"])
    return checkpoint


def write_report(run: Run, args, models: dict, student_checkpoint, teacher_info, check: dict) -> dict:
    """The device artifacts, compression.json/png, samples.png and the metrics record; the compression entry."""
    student, compact = models["student"], models["compact"]
    deploy = write_device_artifacts(run.run_dir, compact, args.seed)
    rows = cost_report(args, models, run.run_dir)
    compression = {**summary(student, compact), **check, "check_samples": args.check_samples,
                   "tolerance": MAX_ABS_DIFF, **deploy}
    teacher_source, teacher_dir = teacher_info
    write_json(run.path("compression.json"), {
        "compression": compression, "teacher_source": teacher_source, "teacher_run": teacher_dir,
        "student_run": student_checkpoint["run_dir"], "cost": rows, "threads": torch.get_num_threads(),
        "throughput_batch": args.throughput_batch,
        "bytes_meaning": {"teacher": "float32 generator state dict", "teacher (ONNX Runtime)": "float ONNX model",
                          "student": "fake-quant float state dict", "compact (eager)": ARTIFACT_NAME,
                          "compact (ONNX Runtime)": RUNTIME_NAME},
        "privacy": describe(student_checkpoint["privacy"], 1e-5)})
    plot_cost_bars(rows, run.path("compression.png"),
                   title=f"teacher vs student vs compact ({compact.bits}-bit, widths {list(compact.channels)})")
    side_by_side_samples({"student": student, "compact": compact}, run.path("samples.png"),
                         f"student vs compact (max |diff| {check['max_abs_diff']:.2g} on the check inputs)")
    run.metrics.append(step=0, max_abs_diff=check["max_abs_diff"], widths=list(compact.channels),
                       artifact_bytes=deploy["artifact_bytes"])
    print(format_table(rows))
    print(shipped_summary(rows, "compact", deploy))
    return compression


def main(args):
    if maybe_dry_run(args):
        return None
    resolve_device(args.device)  # validated; compression, checks and timings run on the CPU
    skip_if_done(args, STAGE)
    set_seed(args.seed)
    student_checkpoint = load_student(args)
    warn_if_not_private(student_checkpoint["privacy"])
    student = build_generator(student_checkpoint).eval()
    compact, check = compress_checked(student, args)
    teacher, teacher_source, teacher_dir = find_teacher(student_checkpoint, student)
    print(f"compact widths {list(student.channels)} -> {list(compact.channels)} at {compact.bits} bits; "
          f"max |compact - student| = {check['max_abs_diff']:.3g} on {args.check_samples} fixed inputs "
          f"({check['check_precision']})")
    print(f"teacher: {teacher_source}")
    run = Run.open(args, STAGE, "w{}-{}-{}-{}bit".format(*compact.channels, compact.bits))
    compression = write_report(run, args, {"teacher": teacher, "student": student, "compact": compact},
                               student_checkpoint, (teacher_source, teacher_dir), check)
    run.save(make_checkpoint(args, student_checkpoint, compact, compression, teacher_dir))
    return run.finish(f"widths {list(compact.channels)}, {compression['artifact_bytes']} bytes")


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
