"""Stage 5: DP fine-tuning of the compact generator on the private split (docs/DESIGN.md, "Privacy").

Only the discriminator reads the private split, and only through DP-SGD (utils/privacy/dp.py, Opacus): Poisson sampling
with expected batch --batch-size, per-sample clipping to --max-grad-norm, Gaussian noise; --d-steps-per-g-step
discriminator steps per generator step, the generator updated with the discriminator's per-sample hooks off. The
generator keeps the compact model's channel widths and bit width; the compact run's discriminator is fine-tuned
too (a fresh one when the compact checkpoint has none).

--target-epsilon is the TOTAL epsilon after this stage: the noise multiplier is calibrated with the parent ledger's
mechanisms as a prefix (a DP teacher's, say), and a target the history already spends is refused. When an earlier
stage read the private split without DP, the total is infinite whatever this stage does: it still runs, with its
own mechanism calibrated to --target-epsilon alone, and says plainly (here and in the model card) that the result
carries no DP guarantee.

Writes <out>/private/<NNNNN>-<desc>/: checkpoint.pt (stage "private"), metrics.jsonl (losses; epsilon every
epoch), samples.png, loss.png, epsilon.png, the device artifacts in stage 4's format (generator.onnx, what a
device runs in ONNX Runtime, with ort_runner.py; generator_int.pt; generator.pt2, a float debugging export),
cost.json (bytes, latency at batch 1 and throughput at batch 256 of generator.onnx in ONNX Runtime and of the
model in eager torch, ratios to the teacher of its lineage measured in the same process), MODEL_CARD.md and
model_card.json.

Audit mode (--audit-canaries M, utils/privacy/audit.py; scored by audit.py): M canaries (by default samples of the
starting generator inserted as real images; --audit-canary-kind mislabelled: test images with a wrong label) are
each inserted into the private split with probability 1/2 from a seeded draw (--seed), and the run goes to its own
directory <out>/audit/<NNNNN>-<desc>/ (stage "audit", its own `latest`, no device artifact, its canaries in
canaries.pt): it never replaces a released model, never moves <out>/private/latest, and its ledger and model card
say it is an audit.
--audit-control switches the DP machinery off for that audit run only, to show that the audit can fail: "no-dp"
(no clipping, no noise: epsilon infinite) or "no-clip" (the calibrated noise, but a clipping norm no gradient
reaches, while the ledger still claims the calibrated epsilon, as a bug would). --audit-subset N trains the audit
on a seeded draw of N private images plus the included canaries (recorded in the ledger's audit entry), so that a
run of minutes shows each canary tens of times; the sample rate and the accounting follow that split's real size.
"""
import copy
import os
import sys

import torch

from models import Discriminator
from utils.compression.cost import format_table
from utils.compression.deploy import shipped_cost_rows, shipped_summary, write_device_artifacts
from utils.data.datasets import add_data_args, check_data_fits, image_request, load_split, seeded_subset
from utils.evaluation.model_card import build_card, write_model_card
from utils.evaluation.plots import save_training_figures
from utils.gan.recipe import Recipe, RecipeConfig, add_recipe_args, check_recipe_args
from utils.privacy.audit import (AUDIT_CONTROLS, CANARY_KINDS, AuditSettings, audit_split, generated_canaries,
                                 load_canaries, make_canaries, save_canaries)
from utils.privacy.dp import DPConfig, DPStep, add_dp_args, plan_for
from utils.privacy.ledger import inherit, is_private, record_audit, record_data_read, warn_if_not_private
from utils.run.checkpoint import build_discriminator, build_generator, data_fields, input_run, lineage, load_checkpoint
from utils.run.cli import (add_common_args, add_input_arg, add_resume_arg, add_speed_args, make_parser, positive_float,
                           positive_int, run_script, set_seed, set_threads, speed_settings)
from utils.run.distributed import data_parallel, distributed, is_writer
from utils.run.files import write_json
from utils.run.lifecycle import Run, TrainConfig, maybe_dry_run, resume_args
from utils.run.trainer import Trainer

STAGE = "private"
AUDIT_STAGE = "audit"
NO_CLIP_NORM = 1e6  # a clipping norm no per-sample gradient reaches: clipping switched off (audit controls only)
PARENT_STAGES = ("compact", "private")  # a fine-tuned model can be fine-tuned again: its ledger composes
# The generator this stage fine-tunes, editable here: None means <out>/compact/latest; --generator-dir overrides it.
GENERATOR_DIR = None


def parse_args(argv=None):
    parser = make_parser(__doc__, "python fine_tune.py --target-epsilon 10          # <out>/compact/latest\n"
                                  "  python fine_tune.py --noise-multiplier 1.0 --accountant rdp --max-steps 200 "
                                  "--desc quick\n"
                                  "  python fine_tune.py --audit-canaries 500 --audit-subset 100 --epochs 110 "
                                  "--batch-size 32 --lr-d 1e-3 --audit-control no-dp   # audit control")
    group = parser.add_argument_group("input")
    add_input_arg(group, "--generator-dir", "GENERATOR_DIR", "compact (or private) run to fine-tune",
                  "<out>/compact/latest")
    add_data_args(parser, default_split="private")
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_float, default=20,
                       help="passes over the private split in expectation: epochs * N/batch D steps "
                            "(may be fractional)")
    group.add_argument("--batch-size", type=positive_int, default=128, help="expected Poisson batch size")
    group.add_argument("--lr-g", type=positive_float, default=1e-4, help="Adam learning rate of the generator")
    group.add_argument("--lr-d", type=positive_float, default=2e-4, help="Adam learning rate of the discriminator")
    group.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    group.add_argument("--log-every", type=positive_int, default=50, help="D steps between metrics records")
    group.add_argument("--checkpoint-every", type=positive_int, default=500,
                       help="D steps between checkpoints (also at every epoch end)")
    add_dp_args(parser, default_target_epsilon=10.0)
    add_recipe_args(parser, losses=False)
    add_speed_args(parser)
    add_audit_args(parser)
    add_common_args(parser)
    add_resume_arg(parser)
    args = parser.parse_args(argv)
    if args.split != "private":
        parser.error("--split: DP fine-tuning reads only the private split (the split the guarantee is about)")
    if args.audit_control != "none" and not args.audit_canaries:
        parser.error("--audit-control: only for an audit run (give --audit-canaries M)")
    if args.audit_subset and not args.audit_canaries:
        parser.error("--audit-subset: only for an audit run (give --audit-canaries M)")
    check_recipe_args(parser, args)
    return args


def add_audit_args(parser):
    group = parser.add_argument_group("privacy audit (a separate run under <out>/audit/, never a released model)")
    group.add_argument("--audit-canaries", type=positive_int, default=None, metavar="M",
                       help="insert M canaries, each with probability 1/2 (seeded by --seed), and train an audit "
                            "run; score it with audit.py")
    group.add_argument("--audit-canary-kind", choices=CANARY_KINDS, default="generated",
                       help="generated: samples of the starting generator inserted as real images (D can only call "
                            "one real by remembering it); mislabelled: test images with a wrong label (weak: D "
                            "barely uses the label)")
    group.add_argument("--audit-control", choices=AUDIT_CONTROLS, default="none",
                       help="none: DP as configured; no-dp: no clipping and no noise; no-clip: the calibrated "
                            "noise with clipping switched off (the ledger still claims the calibrated epsilon)")
    group.add_argument("--audit-subset", type=positive_int, default=None, metavar="N",
                       help="the audit split is a seeded draw (--seed) of N private images plus the included "
                            "canaries, so that a short run shows each canary many times (default: the whole split)")


# ---------------------------------------------------------------- inputs and models

def load_source(args, checkpoint) -> dict:
    """What the networks start from: the resumed run's checkpoint, else the compact (or private) run to
    fine-tune."""
    source = checkpoint or load_checkpoint(input_run(args.generator_dir, GENERATOR_DIR, args.out, "compact"),
                                           PARENT_STAGES)
    warn_if_not_private(source["privacy"])
    return source


def build_models(source: dict, device):
    """The generator (compact widths and bits) and discriminator of a compact or private checkpoint; a fresh
    discriminator (seeded) when the checkpoint has none. A minibatch std layer (from a teacher trained with one)
    is stripped: it mixes samples, which DP-SGD cannot train (docs/DESIGN.md, "Privacy")."""
    G = build_generator(source)
    if "generator_live" in source:  # a resumed run with a weight average: train on from the trained weights
        G.load_state_dict(source["generator_live"])
    if "discriminator" in source:
        D = build_discriminator(source)
    else:
        D = Discriminator(**source["model_args"].get("discriminator", model_shape_of(G)))
    if D.minibatch_std:
        D = D.without_minibatch_std()
        if is_writer():
            print("The discriminator's minibatch std layer is removed for DP-SGD (it mixes samples); its other "
                  "weights are kept.", file=sys.stderr)
    return G.to(device).train(), D.to(device).train()


def say_not_private(ledger: dict, config: DPConfig):
    if is_private(ledger) or not is_writer():
        return
    own = (f"is calibrated to epsilon {config.target_epsilon} alone" if config.noise_multiplier is None
           else f"(sigma {config.noise_multiplier}) has its own epsilon in the model card")
    print(f"WARNING: the result of this run carries NO differential-privacy guarantee: an earlier stage read the "
          f"private split without DP, so the total epsilon is infinite. This stage's own DP-SGD mechanism {own}; "
          f"that bounds only what this stage adds.", file=sys.stderr)


def describe_run(config: DPConfig, dataset: str) -> str:
    budget = f"sigma{config.noise_multiplier:g}" if config.noise_multiplier is not None else \
        f"eps{config.target_epsilon:g}"
    return f"{dataset}-{budget}-{config.accountant}"


# ---------------------------------------------------------------- audit runs

def run_stage(args) -> str:
    """Where the run goes: <out>/private/, or <out>/audit/ for an audit run (never a released model)."""
    return AUDIT_STAGE if getattr(args, "audit_canaries", None) else STAGE


def training_split(args, source: dict, checkpoint) -> tuple:
    """(split, canaries): the private split, or in an audit run the private split (or its --audit-subset) with
    the included canaries appended (canaries None otherwise); a resumed audit run reads back its own canaries."""
    split = load_data(args, source)
    if not getattr(args, "audit_canaries", None):
        return split, None
    if getattr(args, "audit_subset", None):  # getattr: saved args from before the option
        split = seeded_subset(split, args.audit_subset, args.seed)
    if checkpoint is not None:
        canaries = load_canaries(checkpoint["run_dir"], checkpoint["privacy"]["audits"][-1])
    else:
        canaries = build_canaries(args, source, split)
    return audit_split(split, canaries), canaries


def build_canaries(args, source: dict, split):
    """The audit's canaries: samples of the starting generator (default) or mislabelled test images."""
    settings = AuditSettings(canaries=args.audit_canaries, seed=args.seed, kind=args.audit_canary_kind)
    if settings.kind == "generated":
        return generated_canaries(build_generator(source), settings, args.batch_size, split.images.dim())
    test = load_split(args.dataset, "test", args.data_root, args.public_size, args.partition_seed,
                      image_request(args, source["model_args"]["generator"]))
    return make_canaries(test, settings)


def switch_off_dp(args):
    """The no-dp audit control: no noise and a clipping norm no gradient reaches (both recorded in args.json)."""
    if getattr(args, "audit_control", "none") == "no-dp":
        args.noise_multiplier, args.max_grad_norm = 0.0, NO_CLIP_NORM


def broken_clipping_norm(args):
    return NO_CLIP_NORM if getattr(args, "audit_control", "none") == "no-clip" else None


def mark_audit(ledger: dict, args, run: Run, split, canaries):
    """The audit's entry in the ledger; a no-dp control is also a read of the private split without DP."""
    name = os.path.basename(run.run_dir)
    record_audit(ledger, AUDIT_STAGE, name, {**canaries.record(), "control": args.audit_control,
                                             "subset": split.subset})
    save_canaries(run.run_dir, canaries)
    if args.audit_control == "no-dp":
        record_data_read(ledger, AUDIT_STAGE, "private", len(split), name, split.subset)


def run_desc(args, config: DPConfig) -> str:
    desc = describe_run(config, args.dataset)
    if not getattr(args, "audit_canaries", None):
        return desc
    subset = f"-subset{args.audit_subset}" if getattr(args, "audit_subset", None) else ""
    return f"{desc}-canaries{args.audit_canaries}{subset}" + ("" if args.audit_control == "none" else
                                                              f"-{args.audit_control}")


# ---------------------------------------------------------------- outputs and main

def write_outputs(run: Run, G, config: DPConfig, device, args) -> dict:
    """Figures, the device artifacts with their cost report (not for an audit run: never deployed), the card."""
    save_training_figures(run.run_dir, G, "DP fine-tuning", device, private=True)
    artifacts = write_device_artifacts(run.run_dir, G) if run.stage == STAGE else {}
    checkpoint = load_checkpoint(run.run_dir, run.stage)
    if artifacts:
        artifacts["cost"] = cost_report(run.run_dir, G, checkpoint, args, artifacts)
    card = build_card(checkpoint=checkpoint, generator=G, delta=config.delta, accountant=config.accountant,
                      artifacts=artifacts)
    write_model_card(run.run_dir, card)
    return card


def cost_report(run_dir: str, G, checkpoint: dict, args, artifacts: dict):
    """Cost of the fine-tuned generator in eager torch and of its generator.onnx in ONNX Runtime against the
    teacher of its lineage, one process (None, said on stdout, when no teacher run is found)."""
    teacher_dir = lineage(checkpoint)["teacher"]
    if teacher_dir is None:
        print("cost report: no teacher run in this model's lineage, so no ratios")
        return None
    set_threads(args.threads)
    teacher = build_generator(load_checkpoint(teacher_dir, "teacher")).eval()
    model = copy.deepcopy(G).cpu().eval()
    rows = shipped_cost_rows(teacher, "private", model, run_dir, speed_settings(args))
    write_json(os.path.join(run_dir, "cost.json"), {"teacher_run": teacher_dir, "cost": rows,
                                                    "threads": torch.get_num_threads(),
                                                    "throughput_batch": args.throughput_batch})
    print(format_table(rows))
    print(shipped_summary(rows, "private", artifacts))
    return rows


def model_shape_of(G) -> dict:
    """The shape arguments of a discriminator for the data G was built for."""
    return {key: G.model_args()[key] for key in ("num_classes", "image_channels", "image_size")}


def load_data(args, source: dict):
    """The private split, read at the shape the generator of `source` was built for, and checked against it."""
    built_for = source["model_args"]["generator"]
    split = load_split(args.dataset, args.split, args.data_root, args.public_size, args.partition_seed,
                       image_request(args, built_for))
    check_data_fits(split, built_for)
    return split


def main(args):
    if maybe_dry_run(args):
        return None
    with distributed(args.device) as device:  # under torchrun: this process's part of the group
        return fine_tune(args, device)


def fine_tune(args, device):
    """From the resumed or new run to its model card, in one process or as one rank of the torchrun group."""
    args, checkpoint = resume_args(args, run_stage(args))
    source = load_source(args, checkpoint)
    split, canaries = training_split(args, source, checkpoint)
    if checkpoint is None:
        switch_off_dp(args)
    config, train = DPConfig.from_args(args), TrainConfig.from_args(args)
    ledger = source["privacy"] if checkpoint is not None else inherit(source["privacy"])
    plan = plan_for(checkpoint, config, train, split, ledger)  # checks delta, partition and budget
    run = Run.open(args, run_stage(args), run_desc(args, config), checkpoint)
    if canaries is not None and checkpoint is None:
        mark_audit(ledger, args, run, split, canaries)
    if run.stage == STAGE:
        say_not_private(ledger, config)
    set_seed(args.seed)
    G, D = build_models(source, device)
    optimizers = {"g": torch.optim.Adam(G.parameters(), args.lr_g, betas=(args.beta1, 0.999)),
                  "d": torch.optim.Adam(D.parameters(), args.lr_d, betas=(args.beta1, 0.999))}
    data_parallel([G, D], [optimizers["g"]])  # D's DP optimizer reduces its own gradients (utils/privacy/dp.py)
    recipe = Recipe(RecipeConfig.from_args(args, d_steps=config.d_steps_per_g_step), G, args.seed)
    step = DPStep(G, D, optimizers, split, ledger, plan, config, train, run,
                  broken_clipping_norm=broken_clipping_norm(args), recipe=recipe)
    parent = checkpoint["parent"] if checkpoint is not None else source["run_dir"]
    steps = Trainer(step, run, train, args=args, parent=parent, data=data_fields(split)).fit()
    if not is_writer():
        return run.run_dir
    card = write_outputs(run, step.sampling_generator(), config, device, args)
    return run.finish(f"{steps} D steps; {card['privacy']['statement']}")


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
