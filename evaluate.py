"""Evaluate generators of any stage side by side: quality, device cost and privacy (docs/DESIGN.md,
"Evaluation").

Inputs: the latest run of every generator stage found under --out (teacher, student, compact, private), or the
runs named with --runs (or in RUNS at the top of this script). For each generator:
  quality   Frechet distance (FD) between class-balanced generated samples and the real test set, in the
            penultimate-layer features of a reference CNN trained on the real training set (trained once, cached
            under <out>/reference/, its own test accuracy reported); precision and recall (k-NN manifolds, k = 3)
            against as many real test images, in the same features (low recall: within-class collapse);
            downstream accuracy by the published protocol of Bie et al. 2023 (utils.evaluation.metrics.PROTOCOL: 60k
            class-balanced samples, the last 5k held out to choose the epoch, the PyTorch MNIST-example CNN,
            10 epochs; the real test set chooses nothing), or with --quick its labelled quick variant;
  cost      parameters, MACs per image, bytes on disk of the deployable artifact (or of the float state dict
            where a run has no artifact; the table says which), CPU latency at batch 1 and throughput at batch
            256, each also as a ratio to the teacher; a run's generator.onnx is timed like for like, with the
            teacher's own float ONNX model in the same ONNX Runtime (one process, interleaved), the ratio to the
            eager teacher beside it;
  privacy   epsilon and delta of the checkpoint's ledger, and an empirical membership-inference audit: AUC of the
            distance-to-nearest-generated-sample attack, private images the run trained on (members: the whole
            private split, or the seeded subset its ledger records, as for train_teacher.py --subset) against as
            many test images (non-members); about 0.5 means no measurable leakage. A run whose ledger shows no
            read of the private split (no DP mechanism, no non-DP read) has no members: its MIA is n/a.
With --synthetic DIR it scores a released dataset instead (generate.py's ImageFolder tree of PNGs or dataset.npz, or
any ImageFolder/.npz of the data's image shape and classes): FD, precision/recall and downstream accuracy of its
images in its order, as of a generator's samples; for a set written from a run, the numbers of the run's own
samples as the set holds them (docs/DESIGN.md, "Releasing a synthetic dataset").
The same latent vectors and labels are used for every generator. The reference classifier and the audit read
real (also private) data: they are the data holder's measurements, not covered by the generator's DP guarantee.

Writes <out>/eval/<NNNNN>-<desc>/: results.json, results.md (one table), comparison.png (sample grids on the same
z and labels), tradeoff.png (artifact bytes against downstream accuracy and FD), and last a small checkpoint.pt
(stage "eval", the runs evaluated): `<out>/eval/latest` moves only to a complete evaluation. Until then
progress.json holds the rows of the generators measured so far: with --once, an evaluation killed part-way
continues with the next generator.

One process, not torchrun: generation, the reference and downstream classifiers run on --device (auto: a GPU if
there is one, else MPS, else the CPU's threads); latency and throughput are always measured on the CPU.
"""
import argparse
import copy
import math
import os
import time
from dataclasses import asdict

import torch

from utils.compression import deploy, runtime
from utils.compression.cost import COST_KEYS, SAME_RUNTIME, add_ratios, cost_row, state_dict_bytes
from utils.data import synthetic
from utils.data.classes import KNOWN_CLASS_NAMES
from utils.data.datasets import add_data_args, check_data_fits, image_request, load_split, subset_ids, to_unit_range
from utils.evaluation.dataset_card import read_card
from utils.evaluation.metrics import (PROTOCOL, QUICK_PROTOCOL, feature_statistics, frechet_distance, membership_auc,
                                      precision_recall, predict, protocol_accuracy, protocol_variant,
                                      reference_classifier)
from utils.evaluation.plots import plot_tradeoff, side_by_side_samples
from utils.gan.sampling import generated_pool
from utils.privacy.ledger import (ACCOUNTANTS, check_delta, check_same_partition, describe, epsilon, history,
                                  warn_if_not_private)
from utils.run.checkpoint import build_generator, checkpoint_fields, latest_run, lineage, load_checkpoint
from utils.run.cli import (UserError, add_common_args, add_input_arg, format_duration, make_parser, positive_float,
                           positive_int, run_script, set_seed)
from utils.run.distributed import single_process_device
from utils.run.files import read_json, write_json, write_text
from utils.run.lifecycle import Run, interrupted_run, maybe_dry_run, snapshot_file
from utils.run.once import PROGRESS_NAME
from utils.run.precision import add_precision_arg, announce, resolve_precision

STAGE = "eval"
MIA_NOT_READ = "n/a (private split not read)"
GENERATOR_STAGES = ("teacher", "student", "compact", "private")
# The runs to evaluate and the teacher of the cost ratios, editable here: None means every stage's
# <out>/<stage>/latest, and the evaluated (else the runs' own, else the latest) teacher. --runs and --teacher
# override these. Example: RUNS = ["checkpoints/compact/00003-quick", "checkpoints/private/00002-quick"]
RUNS = None
TEACHER_DIR = None
PRESETS = {
    "full": {"num_fd_samples": 10000, "num_downstream_samples": PROTOCOL.num_samples,
             "downstream_epochs": PROTOCOL.epochs, "classifier_epochs": 3,
             "audit_samples": 10000, "audit_members": 1000, "latency_repeats": 50, "throughput_repeats": 10},
    "quick": {"num_fd_samples": 2000, "num_downstream_samples": QUICK_PROTOCOL.num_samples,
              "downstream_epochs": QUICK_PROTOCOL.epochs, "classifier_epochs": 1,
              "audit_samples": 2000, "audit_members": 500, "latency_repeats": 20, "throughput_repeats": 3},
}


EXAMPLES = ("python evaluate.py                       # the latest run of every stage in checkpoints/\n"
            "  python evaluate.py --quick --out runs    # the fast preset of the one-command pipeline\n"
            "  python evaluate.py --runs checkpoints/compact/latest checkpoints/private/00002-eps10")


def add_preset_option(group, key: str, text: str):
    """An integer option whose default comes from the full or the --quick preset (see `apply_preset`)."""
    group.add_argument("--" + key.replace("_", "-"), type=positive_int, default=argparse.SUPPRESS,
                       help=f"{text} (default: {PRESETS['full'][key]}, with --quick {PRESETS['quick'][key]})")


def parse_args(argv=None):
    parser = make_parser(__doc__, EXAMPLES)
    parser.add_argument("--runs", nargs="+", default=None, metavar="RUN",
                        help="run directories (or checkpoints) to evaluate; default: RUNS at the top of this "
                             f"script, else <out>/<stage>/latest of every stage in {', '.join(GENERATOR_STAGES)} "
                             "that exists")
    parser.add_argument("--synthetic", default=None, metavar="DIR",
                        help="score a released dataset instead of generator runs: generate.py's output (a folder "
                             "of PNGs or dataset.npz), or any ImageFolder tree or .npz of the data's image shape "
                             "and classes (FD, precision/recall, downstream accuracy; no cost, no membership audit)")
    add_input_arg(parser, "--teacher", "TEACHER_DIR", "baseline of the cost ratios",
                  "the evaluated teacher, else the evaluated runs' teacher, else <out>/teacher/latest")
    group = parser.add_argument_group("quality")
    group.add_argument("--quick", action="store_true",
                       help="fewer samples, the quick variant of the downstream protocol (fast pipeline; labelled)")
    add_preset_option(group, "num_fd_samples", "generated samples for the Frechet distance and precision/recall")
    add_preset_option(group, "num_downstream_samples",
                      "generated samples of the downstream protocol, its hold-out included (another number than "
                      "the protocol's makes it a labelled variant)")
    add_preset_option(group, "downstream_epochs", "epochs of the downstream protocol's classifier")
    add_preset_option(group, "classifier_epochs", "epochs of the reference classifier")
    group.add_argument("--artifact-downstream", action="store_true",
                       help="also run the downstream protocol on the samples of each run's generator.onnx (one more "
                            "classifier per shipped generator: 30 min each under the published protocol on 2 CPU "
                            "cores); without it the artifact's samples get FD, precision/recall and their largest "
                            "pixel difference from the model's")
    add_precision_arg(group)
    group = parser.add_argument_group("privacy")
    group.add_argument("--delta", type=positive_float, default=1e-5, help="delta of the reported epsilon")
    group.add_argument("--accountant", default="prv", choices=ACCOUNTANTS, help="accountant composing the ledger")
    add_preset_option(group, "audit_samples", "generated samples the membership audit searches")
    add_preset_option(group, "audit_members", "members audited at most (private images the run trained on), and as "
                                              "many test non-members")
    group.add_argument("--audit-same-label", action="store_true",
                       help="search only generated samples of the candidate's own label")
    group = parser.add_argument_group("speed")
    add_preset_option(group, "latency_repeats", "timed batch-1 calls")
    add_preset_option(group, "throughput_repeats", "timed batch-256 calls")
    add_data_args(parser, default_split=None)  # evaluation reads the training set, the private split and the test set
    add_common_args(parser)
    return apply_preset(parser.parse_args(argv))


def apply_preset(args):
    """Fill every unset sample-count option from the full or the --quick preset."""
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def downstream_protocol(args):
    """The published protocol, its quick variant with --quick, or a named variant of either for other counts."""
    return protocol_variant(QUICK_PROTOCOL if args.quick else PROTOCOL, args.num_downstream_samples,
                            args.downstream_epochs)


# ---------------------------------------------------------------- inputs

def run_paths(args) -> list:
    if args.runs or RUNS:
        return args.runs or RUNS
    paths = [latest_run(args.out, stage) for stage in GENERATOR_STAGES if os.path.exists(latest_run(args.out, stage))]
    if not paths:
        raise UserError(f"no generator runs under {args.out!r} (looked for <stage>/latest of "
                        f"{', '.join(GENERATOR_STAGES)}): train one first, or name runs with --runs")
    return paths


def load_runs(paths) -> list:
    """Generator checkpoints of the named runs or snapshot files (each once), with the plain warning for infinite
    epsilon; a snapshot (`--snapshot-steps`) carries `snapshot`: its step."""
    runs, seen = [], set()
    for path in paths:
        checkpoint = load_checkpoint(path, GENERATOR_STAGES)
        snapshot = os.path.isfile(path) and os.path.basename(path) == snapshot_file(checkpoint.get("step", -1))
        key = (checkpoint["run_dir"], checkpoint["step"] if snapshot else None)
        if key in seen:
            continue
        seen.add(key)
        warn_if_not_private(checkpoint["privacy"])
        runs.append({**checkpoint, "snapshot": checkpoint["step"]} if snapshot else checkpoint)
    for checkpoint, label in zip(runs, row_labels(runs)):
        checkpoint["label"] = label
    return runs


def row_labels(runs) -> list:
    """The stage name; where runs of one stage appear, with the run number, or the run's directory name where
    numbers repeat (runs of other pipelines), or its position; `@step` for a snapshot. Labels are unique."""
    run_dirs = {stage: sorted({c["run_dir"] for c in runs if c["stage"] == stage}) for stage in GENERATOR_STAGES}
    labels = []
    for c in runs:
        same_stage = run_dirs[c["stage"]]
        names = [os.path.basename(d) for d in same_stage]
        name = os.path.basename(c["run_dir"])
        if len(same_stage) == 1:
            label = c["stage"]
        elif len({n[:5] for n in names}) == len(names):
            label = f"{c['stage']}#{name[:5]}"
        elif len(set(names)) == len(names):
            label = f"{c['stage']}#{name}"
        else:
            label = f"{c['stage']}#{same_stage.index(c['run_dir']) + 1}"
        labels.append(label + (f"@{c['snapshot']}" if c.get("snapshot") is not None else ""))
    return labels


def load_data(args, built_for: dict) -> dict:
    """Real data as [-1, 1] tensors, read at the shape the generators were built for (`built_for`: their
    model_args): the whole training set and the test set; and the splits themselves (the audit's members)."""
    request = image_request(args, built_for)
    train, test, private = (load_split(args.dataset, split, args.data_root, args.public_size, args.partition_seed,
                                       request) for split in ("all", "test", "private"))
    return {"train": (to_unit_range(train.images), train.labels), "test": (to_unit_range(test.images), test.labels),
            "splits": {"all": train, "test": test, "private": private}, "private": private}


def trained_private_ids(ledger: dict, splits: dict):
    """Training-set positions of the private images the ledger's stages trained on: the whole private split after
    a DP mechanism or a non-DP read of a whole split; only a seeded subset's images where every read was of one
    (train_teacher.py --subset); None where the private split was never read."""
    private = splits["private"].indices
    reads = ledger["non_dp_reads"]
    if history(ledger) or any("subset" not in read for read in reads):
        return private
    if not reads:
        return None
    read = torch.cat([subset_ids(splits[r["subset"]["of"]], r["subset"]) for r in reads])
    return private[torch.isin(private, read)]


def membership_sets(ledger: dict, data: dict, args):
    """(members, non-members, where the members come from) of the membership audit, each set (images in [-1, 1],
    labels); None where the private split was never read (no members: the attack would measure nothing)."""
    pool = trained_private_ids(ledger, data["splits"])
    if pool is None:
        return None
    splits = data["splits"]
    count = min(args.audit_members, len(pool), len(splits["test"]))
    rng = torch.Generator().manual_seed(args.seed + 1)
    members = pool[torch.randperm(len(pool), generator=rng)[:count]]
    nonmembers = torch.randperm(len(splits["test"]), generator=rng)[:count]
    whole = len(pool) == len(splits["private"])
    source = "the whole private split" if whole else f"the {len(pool)} private images of its training subset"
    return splits["all"].batch(members), splits["test"].batch(nonmembers), source


# ---------------------------------------------------------------- per-generator measurements

def artifact_file(run_dir: str):
    """The run's deployable integer artifact (utils/compression/deploy.py's file name), or None where the run has
    none."""
    path = os.path.join(run_dir, deploy.ARTIFACT_NAME)
    return path if os.path.isfile(path) else None


def device_cost(G, run_dir: str, args) -> dict:
    """Parameters, MACs, bytes on disk, CPU latency (batch 1) and throughput (batch 256).

    Bytes: the integer artifact's size where the run has one, else the size of the generator's saved state dict
    (`bytes_source` says which). Speed: of the deployed function (weight quantisation folded in, as in the
    exported program) where there is an artifact, else of the model in eval mode."""
    model = copy.deepcopy(G).cpu().eval()
    path = artifact_file(run_dir)
    if path:
        size, source, run = os.path.getsize(path), f"artifact {os.path.basename(path)}", deploy.folded(model)
    else:
        size, source, run = state_dict_bytes(model), "state dict", None
    speed = {"latency_repeats": args.latency_repeats, "throughput_repeats": args.throughput_repeats}
    row = {**cost_row(model, size, run=run, speed=speed), "bytes_source": source}
    shipped = os.path.join(run_dir, runtime.RUNTIME_NAME)
    if os.path.isfile(shipped):  # what ships: generator.onnx, timed like for like by `runtime_costs`
        row["runtime"] = {"bytes": os.path.getsize(shipped)}
    return row


def runtime_costs(rows, runs, baseline_run, args):
    """What ships, like for like: every run's generator.onnx timed in ONNX Runtime together with the baseline
    teacher's own float ONNX model and the eager teacher, one process, interleaved
    (`utils.compression.deploy.like_for_like_rows`); each row's "runtime" gets its costs, the ratios to the teacher
    in the same runtime and those to the eager teacher. Without a baseline teacher: no timing, no ratios."""
    shipped = {row["label"]: (row, build_generator(checkpoint).cpu().eval()) for row, checkpoint in zip(rows, runs)
               if "runtime" in row}
    if not shipped or baseline_run is None:
        return
    entries = {label: deploy.runtime_entry(model, os.path.join(row["run_dir"], runtime.RUNTIME_NAME))
               for label, (row, model) in shipped.items()}
    teacher = build_generator(load_checkpoint(baseline_run, "teacher")).cpu().eval()
    speed = {"latency_repeats": args.latency_repeats, "throughput_repeats": args.throughput_repeats}
    costs = deploy.like_for_like_rows(teacher, entries, speed, runtime_names=entries)
    for label, (row, _) in shipped.items():
        row["runtime"] = {key: costs[label][key] for key in ("bytes", "latency_ms", "images_per_s", "vs_teacher",
                                                             SAME_RUNTIME, "threads")}


def privacy_summary(ledger: dict, delta: float, accountant: str) -> dict:
    value = epsilon(ledger, delta, accountant)
    return {"epsilon": "inf" if math.isinf(value) else value, "delta": delta, "accountant": accountant,
            "privacy": describe(ledger, delta, accountant), "mechanisms": ledger["mechanisms"],
            "non_dp_reads": ledger["non_dp_reads"]}


def quality(G, checkpoint, context, args, device, timings) -> dict:
    """FD, precision/recall, downstream accuracy and the membership audit, all from one pool of generated
    samples; where the run has a runtime artifact, FD and precision/recall of the artifact's own samples too (same
    z and labels), their largest pixel difference from the model's, and with --artifact-downstream their
    downstream accuracy."""
    size = max(args.num_fd_samples, context["protocol"].num_samples, args.audit_samples)
    start = time.time()
    images, labels = generated_pool(G, size, args.seed, device, checkpoint["label"],
                                    precision=context["precision"].for_use("sampling"))
    timings["generate_s"], start = time.time() - start, time.time()
    result = sample_quality(images, labels, context, args, device, checkpoint["label"], timings)
    start = time.time()
    result.update(membership(images[:args.audit_samples], labels[:args.audit_samples], checkpoint, context["data"],
                             args))
    timings["audit_s"] = time.time() - start
    path = os.path.join(checkpoint["run_dir"], runtime.RUNTIME_NAME)
    if os.path.isfile(path):
        shipped, _ = generated_pool(G, size, args.seed, device, f"{checkpoint['label']} ({runtime.RUNTIME_NAME})",
                                    run=runtime.runtime_forward(path))
        own = sample_quality(shipped, labels, context, args, device, f"{checkpoint['label']} runtime", {},
                             downstream=args.artifact_downstream)
        result.update(fd_runtime=own["fd"], precision_runtime=own["precision"], recall_runtime=own["recall"],
                      runtime_pool_max_abs_diff=(shipped - images).abs().max().item())
        if args.artifact_downstream:
            result["downstream_accuracy_runtime"] = own["downstream_accuracy"]
    return result


def sample_quality(images, labels, context, args, device, desc: str, timings: dict, downstream: bool = True) -> dict:
    """FD and precision/recall of the first --num-fd-samples of `images`, and (unless `downstream` is False) their
    downstream accuracy under the run's protocol (its first `num_samples`, the tail held out)."""
    start = time.time()
    features = predict(context["reference"], images[:args.num_fd_samples], features=True)
    fd = frechet_distance(*feature_statistics(features.numpy()), *context["test_stats"])
    coverage = precision_recall(context["test_features"][:len(features)], features)
    timings["fd_pr_s"], start = time.time() - start, time.time()
    result = {"fd": fd, "precision": coverage["precision"], "recall": coverage["recall"]}
    if not downstream:
        return result
    protocol = context["protocol"]
    n = protocol.num_samples
    accuracy = protocol_accuracy(images[:n], labels[:n], *context["data"]["test"], protocol, device,
                                 desc=f"downstream {desc}", precision=context["precision"].for_use("classifier"))
    timings["downstream_s"] = time.time() - start
    return {**result, "downstream_accuracy": accuracy["test_accuracy"], "downstream_epoch": accuracy["epoch"],
            "downstream_holdout_accuracy": accuracy["holdout_accuracy"]}


def membership(generated, generated_labels, checkpoint: dict, data: dict, args) -> dict:
    """The membership audit's AUC, its members and their source; AUC None (and why) where the run never read the
    private split."""
    sets = membership_sets(checkpoint["privacy"], data, args)
    if sets is None:
        return {"mia_auc": None, "mia_note": MIA_NOT_READ, "audit": {"members": 0, "members_from": None}}
    (members, member_labels), (nonmembers, nonmember_labels), source = sets
    labels = (member_labels, nonmember_labels, generated_labels) if args.audit_same_label else ()
    return {"mia_auc": membership_auc(members, nonmembers, generated, *labels),
            "audit": {"members": len(member_labels), "members_from": source}}


def evaluate_run(checkpoint: dict, context: dict, args, device) -> dict:
    G = build_generator(checkpoint).to(device).eval()
    timings = {}
    row = {"label": checkpoint["label"], "stage": checkpoint["stage"], "run": os.path.basename(checkpoint["run_dir"]),
           "run_dir": checkpoint["run_dir"], "step": checkpoint.get("step"), "snapshot": checkpoint.get("snapshot"),
           "parent": checkpoint.get("parent"),
           "generator": checkpoint["model_args"]["generator"]}
    row.update(quality(G, checkpoint, context, args, device, timings))
    start = time.time()
    row.update(device_cost(G, checkpoint["run_dir"], args))
    timings["cost_s"] = time.time() - start
    row.update(privacy_summary(checkpoint["privacy"], args.delta, args.accountant))
    row["audit"].update(generated=args.audit_samples, same_label=args.audit_same_label)
    row["timings"] = timings
    return row


def run_key(record: dict) -> tuple:
    """What a row measured: the run, its step, and the snapshot (None for the run's own checkpoint)."""
    return record["run_dir"], record.get("step"), record.get("snapshot")


def evaluate_runs(runs, context: dict, args, device, run: Run, measured: list) -> list:
    """A row per run. Rows in `measured` (those an interrupted evaluation had finished, `open_evaluation`) are
    kept for the runs they measured; after each generator, PROGRESS_NAME holds the rows so far, so that an
    evaluation killed part-way continues with the next generator (a published-protocol row takes minutes)."""
    kept = {run_key(row): row for row in measured}
    rows, start, new = [], time.time(), 0
    for number, checkpoint in enumerate(runs, 1):
        row = kept.get(run_key(checkpoint))
        if row is None:
            row, new = evaluate_run(checkpoint, context, args, device), new + 1
            left = (time.time() - start) / new * sum(run_key(c) not in kept for c in runs[number:])
            print(f"{STAGE}: {number}/{len(runs)} {checkpoint['label']} measured, "
                  f"{format_duration(time.time() - start)} so far, about {format_duration(left)} left", flush=True)
        else:
            print(f"{STAGE}: {number}/{len(runs)} {checkpoint['label']}: measured before the interruption, kept",
                  flush=True)
            row = {**row, "label": checkpoint["label"]}
        rows.append(row)
        write_json(run.path(PROGRESS_NAME), {"rows": rows})
    return rows


def open_evaluation(args, desc: str) -> tuple:
    """(the evaluation's Run, the rows it has measured already): with --once, an evaluation of these settings
    killed part-way continues in its own directory with its finished rows (`evaluate_runs`); else a new run."""
    unfinished = interrupted_run(args, STAGE, PROGRESS_NAME)
    if unfinished is None:
        return Run.open(args, STAGE, desc), []
    return Run.reopen(args, STAGE, unfinished), read_json(os.path.join(unfinished, PROGRESS_NAME))["rows"]


def baseline_teacher(rows, runs, args):
    """The teacher run of the cost ratios: --teacher (or TEACHER_DIR), else an evaluated teacher, else the
    evaluated runs' own teacher (`lineage`), else <out>/teacher/latest; None when there is none."""
    chosen = args.teacher or TEACHER_DIR
    evaluated = [row["run_dir"] for row in rows if row["stage"] == "teacher"]
    ancestors = [lineage(checkpoint)["teacher"] for checkpoint in runs]
    for path in (chosen, *evaluated, *ancestors):
        if path:
            return path
    latest = latest_run(args.out, "teacher")
    return latest if os.path.exists(latest) else None


def teacher_cost(rows, runs, args):
    """(cost of the ratio baseline, its run dir), or (None, None)."""
    path = baseline_teacher(rows, runs, args)
    if path is None:
        return None, None
    for row in rows:
        if row["stage"] == "teacher" and row["run_dir"] == os.path.realpath(path):
            return {key: row[key] for key in COST_KEYS}, row["run_dir"]
    checkpoint = load_checkpoint(path, "teacher")
    cost = device_cost(build_generator(checkpoint), checkpoint["run_dir"], args)
    return {key: cost[key] for key in COST_KEYS}, checkpoint["run_dir"]


# ---------------------------------------------------------------- reports

def human(value: float, unit: str = "") -> str:
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}".strip()
    return f"{value:g} {unit}".strip()


def format_epsilon(row) -> str:
    if row["epsilon"] == "inf":
        return "∞ (no DP guarantee)"
    if not row["mechanisms"]:
        return "0 (private split not read)"
    return f"{row['epsilon']:.2f}"


def ratio(row, key) -> str:
    return "-" if not row["vs_teacher"] else f"{row['vs_teacher'][key]:.3g}"


TABLE_COLUMNS = ("stage", "run", "params", "MACs", "bytes on disk", "latency ms (b=1)", "img/s (b=256)",
                 "params ×T", "MACs ×T", "bytes ×T", "latency ×T", "img/s ×T", "FD ↓", "precision ↑", "recall ↑",
                 "downstream acc ↑", "epsilon", "delta", "MIA AUC")


def protocol_label(protocol) -> str:
    """The downstream column's label: the published protocol, its quick variant, or a named variant."""
    return "Bie et al. 2023" if protocol == PROTOCOL else ("quick variant" if protocol == QUICK_PROTOCOL
                                                            else protocol.name)


def table_columns(protocol) -> list:
    """TABLE_COLUMNS with the downstream column labelled by its protocol (published, quick or a variant)."""
    return [f"{name} ({protocol_label(protocol)})" if name == "downstream acc ↑" else name for name in TABLE_COLUMNS]


def table_row(row) -> list:
    return [row["label"], row["run"], human(row["parameters"]), human(row["macs"]),
            f"{human(row['bytes'], 'B')} ({row['bytes_source']})", f"{row['latency_ms']:.2f}",
            f"{row['images_per_s']:.0f}", *(ratio(row, key) for key in COST_KEYS), f"{row['fd']:.2f}",
            f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{100 * row['downstream_accuracy']:.1f}%",
            format_epsilon(row), f"{row['delta']:g}", format_mia(row)]


def format_mia(row) -> str:
    if row["mia_auc"] is None:
        return row["mia_note"]
    whole = row["audit"]["members_from"] == "the whole private split"
    return f"{row['mia_auc']:.3f}" + ("" if whole else f" ({row['audit']['members']} training-subset members)")


SHIPPED_COLUMNS = ("stage", "run", "generator.onnx bytes", "bytes ×T", "latency ms (b=1)", "latency ×T",
                   "img/s (b=256)", "img/s ×T", "latency ×T eager", "img/s ×T eager", "FD ↓ (its samples)",
                   "precision ↑ (its samples)", "recall ↑ (its samples)", "downstream acc ↑ (its samples)",
                   "max |runtime - model|")


def shipped_table(rows) -> list:
    """The runs that have an on-device artifact: its cost in ONNX Runtime and the quality of its own samples."""
    shipped = [row for row in rows if "runtime" in row]
    if not shipped:
        return []
    lines = ["", "What ships: generator.onnx run by ONNX Runtime (utils/compression/runtime.py); ×T: ratio to the "
             "teacher's own float ONNX model in the same ONNX Runtime, ×T eager: to the teacher in eager torch, all "
             "timed in one pass of this process, interleaved (medians); quality of the artifact's own samples (same "
             "z and labels as above).", "",
             "| " + " | ".join(SHIPPED_COLUMNS) + " |", "|" + "---|" * len(SHIPPED_COLUMNS)]
    for row in shipped:
        r = row["runtime"]
        ratios, eager = r.get(SAME_RUNTIME) or {}, r.get("vs_teacher") or {}
        timed = "latency_ms" in r
        cells = [row["label"], row["run"], human(r["bytes"], "B"), _ratio(ratios, "bytes"),
                 f"{r['latency_ms']:.3f}" if timed else "-", _ratio(ratios, "latency_ms"),
                 f"{r['images_per_s']:.0f}" if timed else "-", _ratio(ratios, "images_per_s"),
                 _ratio(eager, "latency_ms"), _ratio(eager, "images_per_s"),
                 f"{row['fd_runtime']:.2f}" if "fd_runtime" in row else "-",
                 f"{row['precision_runtime']:.3f}" if "precision_runtime" in row else "-",
                 f"{row['recall_runtime']:.3f}" if "recall_runtime" in row else "-",
                 f"{100 * row['downstream_accuracy_runtime']:.1f}%" if "downstream_accuracy_runtime" in row
                 else "not run (--artifact-downstream)",
                 f"{row['runtime_pool_max_abs_diff']:.2g}" if "runtime_pool_max_abs_diff" in row else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ratio(ratios: dict, key: str) -> str:
    return f"{ratios[key]:.3g}" if key in ratios else "-"


def results_markdown(rows, reference: dict, baseline_run, args) -> str:
    protocol = downstream_protocol(args)
    lines = ["| " + " | ".join(table_columns(protocol)) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(table_row(row)) + " |" for row in rows]
    lines += shipped_table(rows)
    # the cap where no row has members (all public-only): "up to 0 members" would read as a setting
    members = max([row["audit"]["members"] for row in rows], default=0) or args.audit_members
    lines += ["", *quality_notes(reference, args, "class-balanced generated samples"),
              f"MIA AUC: distance-to-nearest of {args.audit_samples} generated samples"
              f"{' of the same label' if args.audit_same_label else ''}, up to {members} members (private images "
              f"the run trained on: the whole private split, or the seeded subset its ledger records) vs as many "
              f"test non-members (0.5 = no measurable leakage); {MIA_NOT_READ} for a run whose ledger shows no "
              f"read of the private split (it has no members).",
              f"×T: ratio to the teacher ({baseline_run or 'none available'}). Epsilon: {args.accountant.upper()} "
              f"accountant over the ledger's mechanisms."]
    return "\n".join(lines) + "\n"


def quality_notes(reference: dict, args, samples: str) -> list:
    """How FD, precision/recall and the downstream accuracy were measured, on `args.num_fd_samples` `samples`."""
    return [f"Reference classifier (2-conv CNN, {reference['train_size']} real training images, "
            f"{reference['settings']['epochs']} epoch(s)): test accuracy {100 * reference['test_accuracy']:.2f}%"
            f" ({'cached' if reference['cached'] else 'trained'}: {reference['path']}).",
            f"FD: {args.num_fd_samples} {samples} against the real test set, in the reference classifier's "
            f"penultimate features. Precision/recall: k-NN manifolds (k = 3, Kynkaenniemi et al. 2019) of the same "
            f"samples and as many real test images, same features.",
            f"Downstream: {downstream_protocol(args).describe()}.",
            f"Precision of sampling and the downstream classifier: {args.resolved_precision}."]


def write_reports(run: Run, rows, runs, reference: dict, baseline_run, args, device) -> str:
    table = results_markdown(rows, reference, baseline_run, args)
    write_text(run.path("results.md"), table)
    write_json(run.path("results.json"),
               {"rows": rows, "reference_classifier": reference, "teacher_baseline": baseline_run,
                "downstream_protocol": asdict(downstream_protocol(args)),
                "settings": {key: getattr(args, key) for key in (*PRESETS["full"], "audit_same_label", "delta",
                                                                 "accountant", "seed", "max_steps", "quick",
                                                                 "resolved_precision")}})
    side_by_side_samples({checkpoint["label"]: build_generator(checkpoint) for checkpoint in runs},
                         run.path("comparison.png"), "same z and labels (one row per class)", device)
    plot_tradeoff(rows, run.path("tradeoff.png"))
    return table


# ---------------------------------------------------------------- a released dataset (--synthetic)

def load_synthetic(args) -> tuple:
    """(the set at --synthetic, real data, the set's card or None), the set checked against the data's image
    shape and classes and against the sample counts: every refusal comes here, before anything is written."""
    if args.runs:
        raise UserError("--synthetic scores a dataset and --runs generators: give one of them")
    data = load_data(args, {})
    names = data["splits"]["all"].classes or KNOWN_CLASS_NAMES[args.dataset]
    needed = downstream_protocol(args).num_samples
    count = synthetic.count_images(args.synthetic)  # before decoding: a refusal is one line, no progress bar
    if count < max(args.num_fd_samples, needed):
        raise UserError(f"--synthetic {args.synthetic} holds {count} images, but FD takes {args.num_fd_samples} "
                        f"(--num-fd-samples) and the downstream protocol {needed}: write more, or pass smaller "
                        f"counts (--num-downstream-samples makes a labelled variant)")
    released = synthetic.read_set(args.synthetic, data["splits"]["test"].image_shape, names, args.seed)
    return released, data, read_card(args.synthetic)


def synthetic_markdown(row, reference: dict, args) -> str:
    columns = ["set", "images", "FD ↓", "precision ↑", "recall ↑",
               f"downstream acc ↑ ({protocol_label(downstream_protocol(args))})"]
    cells = [row["set"], str(row["images"]), f"{row['fd']:.2f}", f"{row['precision']:.3f}", f"{row['recall']:.3f}",
             f"{100 * row['downstream_accuracy']:.1f}%"]
    privacy = " ".join(row["privacy"]) if row["privacy"] else "not stated (no dataset.json beside the set)"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns), "| " + " | ".join(cells) + " |", "",
             f"Order of the images: {row['order']} (the downstream protocol holds out the last ones).",
             f"Privacy, from the set's dataset.json: {privacy}",
             *quality_notes(reference, args, "images of the set (its first ones)")]
    return "\n".join(lines) + "\n"


def score_synthetic(args, device, precision) -> str:
    """FD, precision/recall and downstream accuracy of the set at --synthetic, measured as `sample_quality`
    measures a generator's pool: the set's images, in its order, take the pool's place."""
    released, data, card = load_synthetic(args)
    run = Run.open(args, STAGE, f"{args.dataset}-synthetic{'-quick' if args.quick else ''}")
    announce(precision, STAGE)
    context = prepare_reference(args, data, device, precision)
    images, labels = to_unit_range(torch.from_numpy(released.images)), torch.from_numpy(released.labels)
    timings = {}
    row = {"label": "synthetic", "set": os.path.realpath(args.synthetic), "images": len(released),
           "order": released.order, **sample_quality(images, labels, context, args, device, "synthetic", timings),
           "privacy": (card or {}).get("privacy_in_words"), "timings": timings}
    table = synthetic_markdown(row, context["reference_info"], args)
    write_text(run.path("results.md"), table)
    write_json(run.path("results.json"),
               {"rows": [row], "reference_classifier": context["reference_info"],
                "downstream_protocol": asdict(downstream_protocol(args)),
                "settings": {key: getattr(args, key) for key in ("num_fd_samples", "num_downstream_samples",
                                                                 "downstream_epochs", "classifier_epochs", "seed",
                                                                 "max_steps", "quick", "resolved_precision")}})
    run.save({**checkpoint_fields(STAGE, args), "synthetic": row["set"]})
    print(table)
    return run.finish(f"synthetic dataset {row['set']}")


# ---------------------------------------------------------------- main

def prepare_reference(args, data, device, precision) -> dict:
    """The cached reference classifier (float32: its features define FD) and the feature statistics of the real
    test set; `precision` is that of sampling and the downstream classifier."""
    settings = {"epochs": args.classifier_epochs, "seed": args.seed, "max_steps": args.max_steps}
    model, info = reference_classifier(os.path.join(args.out, "reference"), args.dataset, data["train"],
                                       data["test"], settings, device)
    start = time.time()
    test_features = predict(model, data["test"][0], features=True)
    info["test_features_s"] = time.time() - start
    order = torch.randperm(len(test_features), generator=torch.Generator().manual_seed(args.seed + 2))
    return {"reference": model, "reference_info": info, "test_stats": feature_statistics(test_features.numpy()),
            "test_features": test_features[order], "data": data, "protocol": downstream_protocol(args),
            "precision": precision}


def load_inputs(args) -> tuple:
    """(generator checkpoints, real data), checked against delta and the partition: every refusal comes here,
    before anything is written."""
    runs = load_runs(run_paths(args))
    data = load_data(args, runs[0]["model_args"]["generator"])
    check_delta(args.delta, len(data["private"]))
    for checkpoint in runs:
        check_data_fits(data["private"], checkpoint["model_args"]["generator"])
        check_same_partition(checkpoint["privacy"], data["private"])
        trained_private_ids(checkpoint["privacy"], data["splits"])  # a recorded subset must rebuild here
    return runs, data


def main(args):
    if maybe_dry_run(args):
        return None
    device = single_process_device(args.device, "evaluate.py")
    precision = resolve_precision(args.precision, device)
    args.resolved_precision = precision.describe()
    set_seed(args.seed)
    if args.synthetic:
        return score_synthetic(args, device, precision)
    runs, data = load_inputs(args)
    run, measured = open_evaluation(args, f"{args.dataset}{'-quick' if args.quick else ''}")
    announce(precision, STAGE)
    context = prepare_reference(args, data, device, precision)
    rows = evaluate_runs(runs, context, args, device, run, measured)
    baseline, baseline_run = teacher_cost(rows, runs, args)
    add_ratios({row["label"]: row for row in rows}, baseline=baseline)
    runtime_costs(rows, runs, baseline_run, args)
    table = write_reports(run, rows, runs, context["reference_info"], baseline_run, args, device)
    run.save({**checkpoint_fields(STAGE, args), "runs": [checkpoint["run_dir"] for checkpoint in runs],
              "snapshots": [checkpoint.get("snapshot") for checkpoint in runs]})
    print(table)
    run_dir = run.finish(f"{len(rows)} generators")
    os.remove(run.path(PROGRESS_NAME))  # results.json holds the rows now
    return run_dir


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
