"""Stage 4: compress the GAN Slimming student into the compact generator and its device artifacts.

Removes every channel whose output is exactly 0 (BatchNorm gamma exactly 0 and beta <= 0: the student's dead
channels), keeping the student's bit width and its stored per-channel weight scales, and checks on fixed seeded
inputs that the compact generator computes the same images as the student in eval mode (refused, nothing
written, if the largest difference exceeds 1e-5). Post-processing of the student: the privacy ledger is copied
unchanged.

Writes `<out>/compact/<NNNNN>-<desc>/`: checkpoint.pt (stage "compact"), generator_int.pt (integer weights:
int8, or packed int4 for <= 4 bits, plus float scales; torch.load(weights_only=True)), generator.pt2 (a
torch.export program that runs with torch alone), compression.json / compression.png (parameters, MACs, bytes,
CPU latency and throughput of teacher, student and compact), samples.png (student vs compact). Runs on the CPU.
"""
import copy
import os

import torch

from models import Generator
from utils.checkpoint import (CHECKPOINT_NAME, MetricsLog, build_generator, latest_run, load_checkpoint,
                              new_run_dir, unwrapped_state_dict, write_json)
from utils.cli import UserError, add_common_args, make_parser, nonnegative_int, positive_int, resolve_device, \
    run_script, set_seed
from utils.compress import MAX_ABS_DIFF, compress, max_abs_difference, summary
from utils.deploy import (ARTIFACT_NAME, PROGRAM_NAME, add_ratios, cost_row, export_program, folded, format_table,
                          load_artifact, load_program, plot_cost_bars, save_artifact, state_dict_bytes)
from utils.gan import fixed_inputs, generate
from utils.plots import sample_grid, save_side_by_side
from utils.privacy import describe, inherit, warn_if_not_private
from utils.training import maybe_dry_run, save_run_checkpoint

STAGE = "compact"
DEPLOY_TOLERANCE = 1e-6  # reloaded artifact / exported program vs the compact model


def parse_args(argv=None):
    parser = make_parser(__doc__, "python compress_student.py                      # <out>/student/latest\n"
                                  "  python compress_student.py --student-dir checkpoints/student/00003-slim")
    group = parser.add_argument_group("compression")
    group.add_argument("--student-dir", default=None,
                       help="student run directory, `latest` link or checkpoint file (None: <out>/student/latest)")
    group.add_argument("--check-samples", type=positive_int, default=4096,
                       help="fixed (z, label) pairs on which compact must equal student")
    group.add_argument("--latency-repeats", type=positive_int, default=50, help="timed batch-1 calls per model")
    group.add_argument("--throughput-repeats", type=positive_int, default=10, help="timed big-batch calls per model")
    group.add_argument("--throughput-batch", type=positive_int, default=256, help="batch size of the throughput test")
    group.add_argument("--threads", type=nonnegative_int, default=0,
                       help="CPU threads for the timings (0: torch's default)")
    add_common_args(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- inputs

def load_student(args) -> dict:
    path = args.student_dir or latest_run(args.out, "student")
    if args.student_dir is None and not os.path.exists(path):
        raise UserError(f"{path}: no student run under --out {args.out} (run train_student.py first, "
                        f"or pass --student-dir)")
    return load_checkpoint(path, "student")


def _parent_field(run_dir: str):
    """The `parent` entry of a run's checkpoint, read lazily (a distill checkpoint may be large)."""
    checkpoint = torch.load(os.path.join(run_dir, CHECKPOINT_NAME), map_location="cpu", weights_only=True,
                            mmap=True)
    return checkpoint.get("parent") if isinstance(checkpoint, dict) else None


def teacher_candidates(student_checkpoint: dict) -> list:
    """The student's `teacher` field, then its distill parent's parent."""
    candidates = [student_checkpoint.get("teacher")]
    parent = student_checkpoint.get("parent")
    if parent and os.path.isfile(os.path.join(str(parent), CHECKPOINT_NAME)):
        try:
            candidates.append(_parent_field(str(parent)))
        except Exception:  # noqa: BLE001 - an unreadable parent only means no teacher from there
            pass
    return [str(c) for c in candidates if c]


def find_teacher(student_checkpoint: dict, student):
    """(teacher generator, source description, teacher run dir or None). Falls back to a float Generator with
    the student's full widths when no teacher run can be loaded (its cost numbers are then the same)."""
    reasons = []
    for path in teacher_candidates(student_checkpoint):
        try:
            checkpoint = load_checkpoint(path, "teacher")
            return build_generator(checkpoint).eval(), f"teacher run {checkpoint['run_dir']}", checkpoint["run_dir"]
        except UserError as exc:
            reasons.append(str(exc))
    fallback = Generator(**{**student.model_args(), "bits": 32}).eval()
    note = "; ".join(reasons) or "the student checkpoint names no teacher run"
    return fallback, (f"no teacher run found ({note}): a float Generator with the student's full widths "
                      f"{list(student.channels)} stands in for it"), None


# ---------------------------------------------------------------- compression

def compress_checked(student, args):
    """(compact, max abs diff): refuses (UserError, before anything is written) above MAX_ABS_DIFF."""
    compact = compress(student)
    diff = max_abs_difference(student, compact, args.check_samples, seed=args.seed)
    if not diff <= MAX_ABS_DIFF:
        raise UserError(f"the compact generator differs from the student by {diff:.3g} (> {MAX_ABS_DIFF:g}) on "
                        f"{args.check_samples} fixed inputs: refused, nothing written")
    return compact, diff


def write_deploy_files(run_dir: str, compact, seed: int) -> dict:
    """The integer artifact and the exported program, each reloaded and checked against the compact model."""
    artifact_path, program_path = os.path.join(run_dir, ARTIFACT_NAME), os.path.join(run_dir, PROGRAM_NAME)
    artifact_bytes = save_artifact(compact, artifact_path)
    export_program(compact, program_path)
    diffs = {"artifact": max_abs_difference(compact, load_artifact(artifact_path), 512, seed=seed + 1)}
    program = load_program(program_path)
    z, labels = compact.sample_inputs(257, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        diffs["program"] = (program(z, labels) - compact.eval()(z, labels)).abs().max().item()
    for name, diff in diffs.items():
        if not diff <= DEPLOY_TOLERANCE:
            raise RuntimeError(f"the reloaded {name} differs from the compact generator by {diff:.3g}")
    return {"artifact": ARTIFACT_NAME, "artifact_bytes": artifact_bytes, "program": PROGRAM_NAME,
            "program_bytes": os.path.getsize(program_path), "max_abs_diff_artifact": diffs["artifact"],
            "max_abs_diff_program": diffs["program"]}


# ---------------------------------------------------------------- report

def cost_report(args, teacher, student, compact, artifact_bytes: int) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    speed = {"latency_repeats": args.latency_repeats, "throughput_repeats": args.throughput_repeats,
             "throughput_batch": args.throughput_batch}
    deployed = folded(compact)  # what generator.pt2 runs: weight quantisation folded in
    rows = {"teacher": cost_row(teacher, state_dict_bytes(teacher), speed=speed),
            "student": cost_row(student, state_dict_bytes(student), speed=speed),
            "compact": cost_row(compact, artifact_bytes, run=deployed, speed=speed)}
    return add_ratios(rows)


def write_samples(run_dir: str, student, compact, diff: float):
    z, labels = fixed_inputs(student)
    grids = {name: sample_grid(generate(model, z, labels), nrow=10)
             for name, model in (("student", student), ("compact", compact))}
    save_side_by_side(grids, os.path.join(run_dir, "samples.png"),
                      title=f"student vs compact (max |diff| {diff:.2g} on the check inputs)")


def make_checkpoint(args, student_checkpoint, compact, compression, teacher_dir) -> dict:
    checkpoint = {"stage": STAGE, "step": 0, "args": vars(args), "parent": student_checkpoint["run_dir"],
                  "teacher": teacher_dir, "model_args": {"generator": compact.model_args()},
                  "generator": unwrapped_state_dict(compact), "privacy": inherit(student_checkpoint["privacy"]),
                  "compression": compression}
    if "discriminator" in student_checkpoint and "discriminator" in student_checkpoint["model_args"]:
        checkpoint["discriminator"] = student_checkpoint["discriminator"]
        checkpoint["model_args"]["discriminator"] = copy.deepcopy(student_checkpoint["model_args"]["discriminator"])
    if "data" in student_checkpoint:
        checkpoint["data"] = copy.deepcopy(student_checkpoint["data"])
    return checkpoint


def main(args):
    if maybe_dry_run(args):
        return None
    resolve_device(args.device)  # validated; compression, checks and timings run on the CPU
    set_seed(args.seed)
    student_checkpoint = load_student(args)
    warn_if_not_private(student_checkpoint["privacy"])
    student = build_generator(student_checkpoint).eval()
    compact, diff = compress_checked(student, args)
    teacher, teacher_source, teacher_dir = find_teacher(student_checkpoint, student)
    print(f"compact widths {list(student.channels)} -> {list(compact.channels)} at {compact.bits} bits; "
          f"max |compact - student| = {diff:.3g} on {args.check_samples} fixed inputs")
    print(f"teacher: {teacher_source}")

    run_dir = new_run_dir(args.out, STAGE, args.desc or "w{}-{}-{}-{}bit".format(*compact.channels, compact.bits))
    write_json(os.path.join(run_dir, "args.json"), vars(args))
    deploy = write_deploy_files(run_dir, compact, args.seed)
    rows = cost_report(args, teacher, student, compact, deploy["artifact_bytes"])
    compression = {**summary(student, compact), "max_abs_diff": diff, "check_samples": args.check_samples,
                   "tolerance": MAX_ABS_DIFF, **deploy}
    report = {"compression": compression, "teacher_source": teacher_source, "teacher_run": teacher_dir,
              "student_run": student_checkpoint["run_dir"], "cost": rows, "threads": torch.get_num_threads(),
              "throughput_batch": args.throughput_batch,
              "bytes_meaning": {"teacher": "float32 generator state dict", "student": "fake-quant float state dict",
                                "compact": ARTIFACT_NAME},
              "privacy": describe(student_checkpoint["privacy"], 1e-5)}
    write_json(os.path.join(run_dir, "compression.json"), report)
    plot_cost_bars(rows, os.path.join(run_dir, "compression.png"),
                   title=f"teacher vs student vs compact ({compact.bits}-bit, widths {list(compact.channels)})")
    write_samples(run_dir, student, compact, diff)
    MetricsLog(run_dir).append(step=0, max_abs_diff=diff, widths=list(compact.channels),
                               artifact_bytes=deploy["artifact_bytes"])
    print(format_table(rows))
    save_run_checkpoint(run_dir, make_checkpoint(args, student_checkpoint, compact, compression, teacher_dir))
    print(f"compact: run directory {run_dir}")
    return run_dir


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
