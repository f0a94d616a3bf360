"""Score audit runs: empirical lower bounds on epsilon from one training run each (utils/privacy/audit.py).

Inputs: audit runs of `fine_tune.py --audit-canaries M` (stage "audit", under <out>/audit/; default: every one
there), or the runs named with --runs. For each run the canaries it stored (canaries.pt) are read and checked
against the fingerprints its ledger records (which canaries there were, which went in); then two attacks score
them:
  white-box  the final discriminator's logit on (canary, its label) minus that of the discriminator the run
             started from (its parent's, public: what training added); for mislabelled canaries minus the same
             change under the image's other wrong labels;
  black-box  minus the distance of the canary to its nearest generated sample of the canary's label, among
             --num-samples class-balanced samples of the run's generator.
Each attack gives guesses, an epsilon lower bound at the run's delta (95% confidence, the k fixed in advance) and
its AUC with a 95% Hanley-McNeil interval. The claimed epsilon is the run's ledger's (infinite for a control run
with the DP machinery off). If any lower bound exceeds the claim, the report is still written and the script then
fails loudly ("AUDIT FAILED", exit code 1): the DP implementation or its accounting is wrong.

Writes <out>/audit-report/<NNNNN>-<desc>/: audit.json, results.md (one table), audit.png (member and non-member
score histograms, a row per run), and a line in each audited run's MODEL_CARD.md and model_card.json.
"""
import json
import math
import os
import sys

import torch

from utils.evaluation.model_card import CARD_JSON, CARD_MD
from utils.privacy.audit import (AuditFailure, AuditSettings, audit_attack, audit_markdown, check_claim,
                                 discriminator_scores, generator_scores, load_canaries, plot_scores, run_rows)
from utils.privacy.ledger import describe, epsilon, is_audit
from utils.run.checkpoint import build_discriminator, build_generator, load_checkpoint, mark_latest, new_run_dir
from utils.run.cli import UserError, add_common_args, make_parser, positive_int, resolve_device, run_script, set_seed
from utils.run.files import atomic_write, write_json
from utils.run.lifecycle import maybe_dry_run

STAGE = "audit-report"
AUDIT_STAGE = "audit"


def parse_args(argv=None):
    parser = make_parser(__doc__, "python audit.py                   # every run under <out>/audit/\n"
                                  "  python audit.py --runs runs/audit/00000-eps10 runs/audit/00001-no-dp")
    parser.add_argument("--runs", nargs="+", default=None, metavar="RUN", help="audit run directories")
    parser.add_argument("--num-samples", type=positive_int, default=10000,
                        help="generated samples the black-box attack searches")
    parser.add_argument("--data-root", default="data", help="directory with the dataset's IDX files")
    add_common_args(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- inputs

def audit_run_paths(args) -> list:
    if args.runs:
        return args.runs
    root = os.path.join(args.out, AUDIT_STAGE)
    names = sorted(n for n in os.listdir(root) if n != "latest") if os.path.isdir(root) else []
    if not names:
        raise UserError(f"no audit runs under {root!r}: run fine_tune.py --audit-canaries M first, or name runs "
                        f"with --runs")
    return [os.path.join(root, name) for name in names]


def load_audit_run(path: str) -> dict:
    checkpoint = load_checkpoint(path, AUDIT_STAGE)
    if not is_audit(checkpoint["privacy"]):
        raise UserError(f"{path}: its ledger records no canaries (not an audit run)")
    return checkpoint


def run_canaries(checkpoint: dict):
    """The run's stored canaries, checked against its ledger's record."""
    return load_canaries(checkpoint["run_dir"], checkpoint["privacy"]["audits"][-1])


def starting_discriminator(checkpoint: dict):
    """The discriminator the run started from (its parent's), or None where the parent has none."""
    parent = load_checkpoint(checkpoint["parent"])
    return build_discriminator(parent) if "discriminator" in parent else None


# ---------------------------------------------------------------- one run

@torch.no_grad()
def generated_samples(G, n: int, seed: int, device, batch_size: int = 500) -> tuple:
    z, labels = G.sample_inputs(n, generator=torch.Generator().manual_seed(seed))
    G.eval()
    images = [G(z[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)).cpu()
              for i in range(0, n, batch_size)]
    return torch.cat(images), labels


def claimed_epsilon(checkpoint: dict) -> float:
    args = checkpoint["args"]
    return epsilon(checkpoint["privacy"], args["delta"], args["accountant"])


def audit_one(checkpoint: dict, args, device) -> dict:
    """Scores, results and table rows of one audit run."""
    canaries = run_canaries(checkpoint)
    start = starting_discriminator(checkpoint)
    D = build_discriminator(checkpoint).to(device)
    white = discriminator_scores(D, canaries, None if start is None else start.to(device), device,
                                 label_control=canaries.kind == "mislabelled")
    images, labels = generated_samples(build_generator(checkpoint).to(device), args.num_samples, args.seed, device)
    scores = {"white-box": white, "black-box": generator_scores(canaries, images, labels)}
    included, delta = canaries.included.numpy(), checkpoint["args"]["delta"]
    settings = AuditSettings(canaries=len(canaries), seed=canaries.seed, kind=canaries.kind)
    results = [audit_attack(name, values, included, delta, settings) for name, values in scores.items()]
    run = os.path.basename(checkpoint["run_dir"])
    claim = claimed_epsilon(checkpoint)
    return {"run": run, "run_dir": checkpoint["run_dir"], "claimed_epsilon": claim, "results": results,
            "rows": run_rows(run, claim, results), "scores": scores, "included": included,
            "white_box_reference": "parent discriminator" if start is not None else "none (raw logits)",
            "privacy": describe(checkpoint["privacy"], delta, checkpoint["args"]["accountant"]),
            "control": checkpoint["args"].get("audit_control", "none"), "settings": vars(settings),
            "audit_split": audit_split_text(checkpoint)}


def audit_split_text(checkpoint: dict) -> str:
    """What the audit run trained on besides the canaries: the private split, or its seeded subset."""
    subset = checkpoint["privacy"]["audits"][-1].get("subset")
    if not subset:
        return "the private split"
    return f"a seeded subset of {subset['size']} private images (seed {subset['seed']}, {subset['fingerprint']})"


# ---------------------------------------------------------------- reports

def card_line(audited: dict, report_dir: str) -> str:
    bounds = ", ".join(f"{r.attack} {r.epsilon_lower_bound:.2f} (AUC {r.auc:.3f})" for r in audited["results"])
    claim = audited["claimed_epsilon"]
    claim_text = "inf (no DP)" if math.isinf(claim) else f"{claim:.2f}"
    return (f"Empirical privacy audit (one run, {audited['results'][0].canaries} canaries; {report_dir}): epsilon "
            f"lower bound at 95% confidence {bounds}; claimed epsilon {claim_text}.")


def add_card_line(audited: dict, report_dir: str):
    """The audit's line in the audited run's model card, where it has one."""
    run_dir, line = audited["run_dir"], card_line(audited, report_dir)
    md_path, json_path = os.path.join(run_dir, CARD_MD), os.path.join(run_dir, CARD_JSON)
    if os.path.isfile(md_path):
        with open(md_path) as handle:
            text = handle.read()
        with atomic_write(md_path) as handle:
            handle.write(f"{text}\n## Empirical privacy audit\n\n{line}\n")
    if os.path.isfile(json_path):
        with open(json_path) as handle:
            card = json.load(handle)
        card["audit_result"] = {"line": line, "report": report_dir, "rows": audited["rows"]}
        write_json(json_path, card)


def write_reports(report_dir: str, audited: list, args) -> str:
    rows = [row for entry in audited for row in entry["rows"]]
    table = audit_markdown(rows)
    with atomic_write(os.path.join(report_dir, "results.md")) as handle:
        handle.write("# One-run privacy audit (Steinke, Nasr & Jagielski 2023)\n\n" + table + "\n" + "\n".join(
            f"- {e['run']}: {e['privacy']}; control: {e['control']}; canaries added to {e['audit_split']}; white-box "
            f"reference: {e['white_box_reference']}" for e in audited) + "\n")
    write_json(os.path.join(report_dir, "audit.json"),
               {"rows": rows, "runs": [{k: e[k] for k in ("run", "run_dir", "privacy", "control", "settings",
                                                         "white_box_reference", "audit_split")} for e in audited],
                "settings": {"num_samples": args.num_samples, "seed": args.seed}})
    plot_scores({e["run"]: (e["scores"], e["included"]) for e in audited}, os.path.join(report_dir, "audit.png"))
    for entry in audited:
        add_card_line(entry, report_dir)
    return table


# ---------------------------------------------------------------- main

def main(args):
    if maybe_dry_run(args):
        return None
    device = resolve_device(args.device)
    set_seed(args.seed)
    checkpoints = [load_audit_run(path) for path in audit_run_paths(args)]
    audited = [audit_one(checkpoint, args, device) for checkpoint in checkpoints]
    report_dir = new_run_dir(args.out, STAGE, args.desc or f"{len(audited)}-runs")
    print(write_reports(report_dir, audited, args))
    mark_latest(report_dir)
    print(f"audit report: {report_dir}")
    for entry in audited:
        check_claim(entry["claimed_epsilon"], entry["results"])
    return report_dir


def run_audit(argv=None) -> int:
    """run_script, plus: a failed audit is one loud line on stderr and exit code 1."""
    try:
        return run_script(main, parse_args, argv)
    except AuditFailure as exc:
        print(str(exc), file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(run_audit())
