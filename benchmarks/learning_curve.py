"""Learning curve of a teacher or student run from its snapshots (`--snapshot-steps`): quality against steps.

For every snapshot of --run (and its final checkpoint), `evaluate.py` measures FD, precision and recall on
--fd-samples class-balanced samples (reference classifier of --classifier-epochs on the 60k real training images,
the same for every row so FD is comparable along the curve) and downstream accuracy under the quick variant of
the protocol; at --published-steps (`last`: the final checkpoint) also under the published protocol of Bie et al.
2023. For a student, the eval-mode distillation loss on the first 2,000 triples of its distillation set too.
Beside the curve: the quick variant's real-data ceiling, its classifier trained on as many real public images as it
uses generated ones (6,000: 5,000 to train, 1,000 held out), so a reader sees where the quick variant stops
telling generators apart.

Resumable: each evaluation's numbers go to <out>/curve.json as soon as they exist; a second call measures only
what is missing and redraws the table and plot. Writes <results-dir>/<name>.md and .png.

  OMP_NUM_THREADS=1 python benchmarks/learning_curve.py --run runs/teacher/latest --name teacher_curve \\
      --out /work/runs/curve-eval --published-steps 4000 16000 last
"""
import glob
import json
import os
import re
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from utils.compression.slimming import eval_distill_loss  # noqa: E402
from utils.data.datasets import load_split, seeded_subset, to_unit_range  # noqa: E402
from utils.data.distill import load_distill_set  # noqa: E402
from utils.evaluation.metrics import QUICK_PROTOCOL, protocol_variant, real_data_ceiling  # noqa: E402
from utils.evaluation.plots import plot_curves  # noqa: E402
from utils.run.checkpoint import CHECKPOINT_NAME, build_generator, load_checkpoint  # noqa: E402
from utils.run.cli import UserError, make_parser, positive_int, run_script  # noqa: E402
from utils.run.files import write_json, write_text  # noqa: E402

PROTOCOLS = ("quick", "published")


def parse_args(argv=None):
    parser = make_parser(__doc__, "python benchmarks/learning_curve.py --run checkpoints/teacher/latest "
                                  "--name teacher_curve --out /tmp/curve --published-steps last")
    parser.add_argument("--run", required=True, help="teacher or student run directory with snapshots")
    parser.add_argument("--name", required=True, help="file name of the table and plot, e.g. teacher_curve")
    parser.add_argument("--out", required=True, help="pipeline root of the evaluations and curve.json")
    parser.add_argument("--published-steps", nargs="*", default=["last"], metavar="STEP",
                        help="steps also measured under the published protocol ('last': the final checkpoint)")
    parser.add_argument("--fd-samples", type=positive_int, default=10000)
    parser.add_argument("--classifier-epochs", type=positive_int, default=3, help="reference classifier epochs")
    parser.add_argument("--precision", default="auto", help="evaluate.py --precision")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-args", default="", help="more evaluate.py flags, e.g. \"--data-root data\"")
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    return parser.parse_args(argv)


def checkpoints_of(run_dir: str) -> dict:
    """{step: file} of the run's snapshots and its final checkpoint; a run still short of its --max-steps (in
    progress, or interrupted) gives its snapshots only."""
    found = {int(re.search(r"snapshot-(\d+)\.pt$", path).group(1)): path
             for path in glob.glob(os.path.join(run_dir, "snapshot-*.pt"))}
    final = load_checkpoint(run_dir)
    if final["step"] >= (final["args"].get("max_steps") or 0):
        found.setdefault(final["step"], os.path.join(run_dir, CHECKPOINT_NAME))
    return dict(sorted(found.items()))


def evaluate_file(path: str, protocol: str, args) -> dict:
    """One evaluate.py run of one checkpoint file under the quick or the published protocol."""
    import evaluate
    argv = ["--out", args.out, "--runs", path, "--device", args.device, "--precision", args.precision,
            "--num-fd-samples", str(args.fd_samples), "--classifier-epochs", str(args.classifier_epochs),
            "--desc", f"curve-{protocol}", *(["--quick"] if protocol == "quick" else []), *shlex.split(args.eval_args)]
    start = time.time()
    run_dir = evaluate.main(evaluate.parse_args(argv))
    row = json.load(open(os.path.join(run_dir, "results.json")))["rows"][0]
    return {key: row[key] for key in ("fd", "precision", "recall", "downstream_accuracy", "downstream_epoch")} | \
        {"eval_dir": run_dir, "eval_seconds": round(time.time() - start, 1)}


def student_distill_loss(path: str) -> float:
    checkpoint = load_checkpoint(path, "student")
    distill = load_distill_set(checkpoint["parent"])
    return eval_distill_loss(build_generator(checkpoint), distill, checkpoint["args"].get("distill_loss", "l1"))


def quick_ceiling(run_dir: str, device) -> dict:
    """The quick variant's protocol on real images of the run's training split (or of its teacher's): as many as
    the variant uses generated ones."""
    checkpoint = load_checkpoint(run_dir)
    data = checkpoint.get("data") or load_checkpoint(checkpoint["teacher"], "teacher")["data"]
    args = checkpoint["args"] if checkpoint["stage"] == "teacher" else load_checkpoint(checkpoint["teacher"])["args"]
    split = load_split(data["dataset"], data["split"], args["data_root"], args["public_size"], args["partition_seed"])
    test = load_split(data["dataset"], "test", args["data_root"], args["public_size"], args["partition_seed"])
    count = min(QUICK_PROTOCOL.num_samples, len(split))  # fewer only for a split smaller than that (tests)
    real = seeded_subset(split, count, QUICK_PROTOCOL.seed)
    result = real_data_ceiling(to_unit_range(real.images), real.labels, to_unit_range(test.images), test.labels,
                               protocol_variant(QUICK_PROTOCOL, count), device)
    return {"test_accuracy": result["test_accuracy"], "images": count, "split": data["split"]}


def measure(args, state: dict, save) -> dict:
    """Fill `state` with every missing measurement, saving after each."""
    files = checkpoints_of(args.run)
    published = {max(files) if step == "last" else int(step) for step in args.published_steps}
    student = load_checkpoint(args.run)["stage"] == "student"
    if "ceiling" not in state:
        state["ceiling"] = quick_ceiling(args.run, args.device)
        save()
    for step, path in files.items():
        row = state["rows"].setdefault(str(step), {"step": step, "file": path})
        for protocol in PROTOCOLS:
            if protocol not in row and (protocol == "quick" or step in published):
                print(f"step {step}: {protocol} protocol", flush=True)
                row[protocol] = evaluate_file(path, protocol, args)
                save()
        if student and "distill_loss" not in row:
            row["distill_loss"] = student_distill_loss(path)
            save()
    return state


def markdown(state: dict, args) -> str:
    rows = [state["rows"][key] for key in sorted(state["rows"], key=int)]
    student = any("distill_loss" in row for row in rows)
    head = ["step", *(["distillation L1"] if student else []), "FD", "precision", "recall", "downstream (quick)",
            "downstream (published)"]
    lines = [f"# Learning curve: {os.path.basename(os.path.realpath(args.run))}", "",
             f"Run: `{state['settings']['run_args']}`.", f"Measured by `{state['settings']['command']}` "
             f"({state['settings']['threads']} thread(s), precision {args.precision}); FD and precision/recall on "
             f"{args.fd_samples} samples, reference classifier {args.classifier_epochs} epochs on the 60k real "
             f"training images.",
             f"Quick variant's real-data ceiling ({state['ceiling']['images']} real {state['ceiling']['split']} "
             f"images, the quick protocol): **{100 * state['ceiling']['test_accuracy']:.1f} %**.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        quick, published = row.get("quick", {}), row.get("published")
        cells = [str(row["step"]), *([f"{row['distill_loss']:.4f}"] if student else []),
                 f"{quick['fd']:.2f}" if quick else "-", f"{quick['precision']:.3f}" if quick else "-",
                 f"{quick['recall']:.3f}" if quick else "-",
                 f"{100 * quick['downstream_accuracy']:.1f} %" if quick else "-",
                 f"{100 * published['downstream_accuracy']:.1f} %" if published else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(state: dict, path: str, title: str):
    rows = [state["rows"][key] for key in sorted(state["rows"], key=int) if "quick" in state["rows"][key]]
    records = [{"step": r["step"], "FD / 100": r["quick"]["fd"] / 100, "recall": r["quick"]["recall"],
                "precision": r["quick"]["precision"], "downstream (quick)": r["quick"]["downstream_accuracy"],
                **({"downstream (published)": r["published"]["downstream_accuracy"]} if "published" in r else {}),
                **({"distillation L1 x 10": 10 * r["distill_loss"]} if "distill_loss" in r else {}),
                "quick ceiling": state["ceiling"]["test_accuracy"]} for r in rows]
    keys = ["FD / 100", "precision", "recall", "downstream (quick)", "downstream (published)", "quick ceiling",
            "distillation L1 x 10"]
    plot_curves(records, keys, path, title, ylabel="value", logx=True)


def main(args):
    if not os.path.isdir(args.run):
        raise UserError(f"--run {args.run}: no such run directory")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "curve.json")
    state = json.load(open(path)) if os.path.isfile(path) else {"rows": {}}
    run_args = load_checkpoint(args.run)["args"]
    state["settings"] = {"command": "python " + " ".join(sys.argv), "threads": torch.get_num_threads(),
                         "run_args": " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(run_args.items())
                                              if v not in (None, False))}
    measure(args, state, lambda: write_json(path, state))
    os.makedirs(args.results_dir, exist_ok=True)
    table = markdown(state, args)
    write_text(os.path.join(args.results_dir, f"{args.name}.md"), table)
    plot(state, os.path.join(args.results_dir, f"{args.name}.png"), args.name.replace("_", " "))
    print(table)
    return state


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
