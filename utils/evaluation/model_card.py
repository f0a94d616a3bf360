"""The model card of a DP fine-tuned generator: `MODEL_CARD.md` for people, `model_card.json` for programs.

It states what the model is and costs on a device, which data shaped it, and the privacy guarantee with every
number needed to check it (docs/DESIGN.md, "Privacy"): the total epsilon over every stage's mechanism and this
stage's own, delta, the accountant, each mechanism (sigma, q, steps, C), the public data used, the non-DP reads of
the private split (any one makes the total infinite, said plainly), and the noise generator used. In the JSON an
infinite epsilon is the string "inf" (JSON has no infinity). Runs are named relative to the pipeline root
`<out>`, so the card stays true when the pipeline directory is moved or copied.
"""
import math
import os

from utils.compression.cost import RUNTIME_SUFFIX, SAME_RUNTIME, count_parameters
from utils.privacy.ledger import SECURE_RNG_NOTE, compose_epsilon, epsilon, history, is_private
from utils.run.checkpoint import pipeline_root, relative_to_root
from utils.run.files import write_json, write_text

CARD_MD, CARD_JSON = "MODEL_CARD.md", "model_card.json"


def _number(value: float):
    return value if math.isfinite(value) else "inf"


def mechanism_rows(ledger: dict, delta: float, accountant: str) -> list:
    """Every DP mechanism of the ledger, each with the epsilon it would have alone."""
    rows = []
    for m in ledger["mechanisms"]:
        alone = compose_epsilon(history({"mechanisms": [m]}), delta, accountant)
        rows.append({"stage": m["stage"], "run": m["run"], "noise_multiplier": m["noise_multiplier"],
                     "sample_rate": m["sample_rate"], "steps": m["steps"], "max_grad_norm": m["max_grad_norm"],
                     "epsilon_alone": _number(alone)})
    return rows


def _epsilon_text(value) -> str:
    return "inf" if value == "inf" or not math.isfinite(value) else f"{value:.3f}"


def statement(ledger: dict, total: float, own, delta: float, accountant: str) -> str:
    """The guarantee in one sentence; `own` (this stage's mechanism alone) may be "inf" (no noise)."""
    size, dataset = ledger.get("private_size"), ledger.get("dataset")
    if not is_private(ledger):
        reads = ", ".join(f"{r['stage']} ({r['split']} split, run {r['run']})" for r in ledger["non_dp_reads"])
        return (f"NO differential-privacy guarantee: epsilon = inf, because {reads} read the private split without "
                f"DP. This stage's own DP-SGD mechanism alone has epsilon {_epsilon_text(own)} at delta {delta:g}; "
                f"that bounds only what this stage added, not the model.")
    return (f"({total:.3f}, {delta:g})-differential privacy with respect to the private split of {dataset} "
            f"({size} images, fingerprint {ledger.get('private_fingerprint')}), add/remove-one adjacency, "
            f"{len(ledger['mechanisms'])} DP-SGD mechanism(s) composed by the {accountant.upper()} accountant "
            f"(this stage alone: epsilon {_epsilon_text(own)}).")


def privacy_section(ledger: dict, delta: float, accountant: str, stage: str, run: str) -> dict:
    rows = mechanism_rows(ledger, delta, accountant)
    own = next((r["epsilon_alone"] for r in rows if r["stage"] == stage and r["run"] == run), 0.0)
    total = epsilon(ledger, delta, accountant)
    return {"guarantee": is_private(ledger), "statement": statement(ledger, total, own, delta, accountant),
            "epsilon_total": _number(total), "epsilon_this_stage": own, "delta": delta, "accountant": accountant,
            "adjacency": "add/remove one image (with its label) of the private split",
            "mechanisms": rows, "non_dp_reads": ledger["non_dp_reads"], "public_data": ledger["public_data"],
            "secure_rng": False, "secure_rng_note": SECURE_RNG_NOTE}


def build_card(*, checkpoint: dict, generator, delta: float, accountant: str, artifacts: dict) -> dict:
    """The card of a stage-5 checkpoint (as loaded) and its generator."""
    ledger, args = checkpoint["privacy"], checkpoint["args"]
    run, root = os.path.basename(checkpoint["run_dir"]), pipeline_root(checkpoint["run_dir"])
    return {
        "model": {"description": "class-conditional generator (compact, quantised), DP fine-tuned",
                  "stage": checkpoint["stage"], "run_dir": relative_to_root(checkpoint["run_dir"], root),
                  "parent": relative_to_root(checkpoint["parent"], root),
                  "model_args": generator.model_args(), "parameters": count_parameters(generator),
                  "bits": generator.bits, "channels": list(generator.channels)},
        "artifacts": artifacts,
        "data": {"dataset": ledger.get("dataset"), "private_split_size": ledger.get("private_size"),
                 "private_fingerprint": ledger.get("private_fingerprint"), "public_size": ledger.get("public_size"),
                 "partition_seed": ledger.get("partition_seed"),
                 "public_data_used": bool(ledger["public_data"]), "test_set": "never trained on"},
        "privacy": privacy_section(ledger, delta, accountant, checkpoint["stage"], run),
        "training": {"discriminator_steps": checkpoint["step"], "epochs": args.get("epochs"),
                     "expected_batch_size": args.get("batch_size"),
                     "d_steps_per_g_step": args.get("d_steps_per_g_step"),
                     "grad_sample_mode": args.get("grad_sample_mode"), "lr_g": args.get("lr_g"),
                     "lr_d": args.get("lr_d"), "target_epsilon": args.get("target_epsilon"),
                     "noise_multiplier_given": args.get("noise_multiplier"), "seed": args.get("seed")},
        "versions": checkpoint.get("versions", {}),
        "audit": ledger.get("audits", []),
    }


# ---------------------------------------------------------------- markdown

def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(rows: list, columns: list) -> list:
    if not rows:
        return ["none"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def _layer_check_text(check: dict = None) -> str:
    """The artifact check's second guard (utils/compression/reference.py, `layer_check`) in a clause."""
    if not check:
        return ""
    layers = check["layers"].values()
    flips, total = sum(v["flips"] for v in layers), sum(v["activations"] for v in layers)
    violations = sum(v["violations"] for v in layers)
    return (f"; its integer program checked layer by layer against the compact model: {violations} activations off "
            f"by more than rounding allows, {flips} of {total} at a rounding boundary on the other side")


def _artifact_lines(a: dict) -> list:
    """What ships (generator.onnx), the other files, and the cost table measured at the end of the stage: ratios to
    the teacher in the same runtime (the headline), and to the eager teacher (labelled)."""
    exact = {True: "bit for bit equal to its eager integer reference (utils/compression/reference.py) on "
                   f"{a.get('runtime_check_samples', '-')} samples", False: "NOT equal to its integer reference",
             None: "no integer reference (float model)"}[a.get("runtime_exact")]
    lines = [f"- on-device artifact: {a.get('runtime_artifact') or 'not written'} ({a.get('runtime_bytes', '-')} "
             f"bytes, {a.get('runtime', 'ONNX Runtime')}); run it without torch with {a.get('runtime_runner', '-')};"
             f" layers outside QLinearConv: {', '.join(a.get('runtime_float_layers', [])) or '-'}; {exact}"
             f"{_layer_check_text(a.get('runtime_layer_check'))}; abs "
             f"difference to the compact model's float arithmetic: max {_fmt(a.get('runtime_max_abs_diff'))}, mean "
             f"{_fmt(a.get('runtime_mean_abs_diff'))}"
             + (f"; {a['runtime_note']}" if a.get("runtime_note") else ""),
             f"- integer weight file: {a.get('artifact', 'not written')} ({a.get('artifact_bytes', '-')} bytes); "
             f"{a.get('program', 'generator.pt2')} ({a.get('program_bytes', '-')} bytes) is a float debugging export"]
    if a.get("cost"):
        rows = [_cost_cells(name, row) for name, row in a["cost"].items()]
        threads = next(iter(a["cost"].values())).get("threads", "torch's default")
        lines += ["", f"Cost on this machine's CPU, measured by this stage at its end: one process, {threads} "
                      "thread(s) for torch and ONNX Runtime alike, all models timed interleaved (medians). xT: ratio "
                      "to the teacher in the same runtime (ONNX Runtime rows: the teacher's own float ONNX model); "
                      "xT eager: to the teacher in eager torch. Re-measure: `python benchmarks/bench_compression.py "
                      "--compact-dir <this run>`.", ""]
        lines += _table(rows, list(rows[0]))
    return lines


def _cost_cells(name: str, row: dict) -> dict:
    like = row.get(SAME_RUNTIME) or row["vs_teacher"]
    eager = row["vs_teacher"] if name.endswith(RUNTIME_SUFFIX) else {}
    return {"model": name, "bytes": row["bytes"], "ms (b=1)": row["latency_ms"], "img/s": row["images_per_s"],
            "bytes xT": like["bytes"], "latency xT": like["latency_ms"], "img/s xT": like["images_per_s"],
            "latency xT eager": eager.get("latency_ms", "-"), "img/s xT eager": eager.get("images_per_s", "-")}


def audit_lines(audits) -> list:
    """The plain note of an audit run (utils/privacy/audit.py): canaries went into its private data."""
    return [f"**AUDIT run, not a released model**: {a['canaries']} canaries ({a['kind']}), {a['included']} of them "
            f"inserted into the private split (seed {a['seed']}), DP control: {a.get('control', 'none')}. "
            f"Score it with audit.py." for a in audits or []] + ([""] if audits else [])


def render_markdown(card: dict) -> str:
    m, d, p, t, a = card["model"], card["data"], card["privacy"], card["training"], card["artifacts"]
    headline = "**Differential privacy**" if p["guarantee"] else "**WARNING**"
    lines = [f"# Model card: {os.path.basename(m['run_dir'])}", "", m["description"] + ".", "",
             "## Privacy", "", f"{headline}: {p['statement']}", "", *audit_lines(card.get("audit")),
             f"- epsilon (total, all stages): {_fmt(p['epsilon_total'])}",
             f"- epsilon (this stage's mechanism alone): {_fmt(p['epsilon_this_stage'])}",
             f"- delta: {p['delta']:g}; accountant: {p['accountant'].upper()} (Opacus); adjacency: {p['adjacency']}",
             f"- noise generator: not cryptographically secure. {p['secure_rng_note']}", "",
             "DP-SGD mechanisms applied to the private split:", ""]
    lines += _table(p["mechanisms"], ["stage", "run", "noise_multiplier", "sample_rate", "steps", "max_grad_norm",
                                      "epsilon_alone"])
    lines += ["", "Reads of the private split WITHOUT differential privacy (any one makes epsilon infinite):", ""]
    lines += _table(p["non_dp_reads"], ["stage", "split", "size", "run"])
    lines += ["", "## Data", "",
              f"- dataset: {d['dataset']}; private split: {d['private_split_size']} images "
              f"(fingerprint {d['private_fingerprint']}, public size {d['public_size']}, partition seed "
              f"{d['partition_seed']}); the test set is {d['test_set']}",
              f"- public data that shaped the model: {'yes' if d['public_data_used'] else 'none'}", ""]
    lines += _table(p["public_data"], ["stage", "split", "size", "run"])
    lines += ["", "## Model and device artifact", "",
              f"- widths {m['channels']}, {m['bits']}-bit weights and activations, {m['parameters']:,} parameters",
              *_artifact_lines(a),
              f"- run: {m['run_dir']}; parent: {m['parent']} (both relative to the pipeline directory)", "",
              "## Training", ""]
    lines += [f"- {key}: {_fmt(value)}" for key, value in t.items() if value is not None]
    return "\n".join(lines) + "\n"


def write_model_card(run_dir: str, card: dict) -> tuple:
    md_path, json_path = os.path.join(run_dir, CARD_MD), os.path.join(run_dir, CARD_JSON)
    write_json(json_path, card)
    write_text(md_path, render_markdown(card))
    return md_path, json_path
