"""Stage 5: DP fine-tuning of the compact generator on the private split (DESIGN section 4).

Only the discriminator reads the private split, and only through DP-SGD (utils/dp.py, Opacus): Poisson sampling
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
epoch), samples.png, loss.png, epsilon.png, the device artifact in stage 4's format (generator_int.pt,
generator.pt2), MODEL_CARD.md and model_card.json.
"""
import os
import sys

import torch
from tqdm import tqdm

from models import Discriminator
from utils.checkpoint import build_discriminator, build_generator, latest_run, load_checkpoint, read_metrics, \
    unwrapped_state_dict
from utils.cli import add_common_args, add_resume_arg, make_parser, positive_float, positive_int, resolve_device, \
    run_script, set_seed
from utils.data import add_data_args, load_split
from utils.dp import DPGANTrainer, add_dp_args, plan_run, plot_epsilon
from utils.gan import fixed_inputs, generate
from utils.model_card import build_card, write_model_card
from utils.plots import plot_curves, save_samples
from utils.privacy import check_same_partition, inherit, is_private, warn_if_not_private
from utils.training import maybe_dry_run, open_run, resume_args, save_run_checkpoint, start_run

STAGE = "private"
PARENT_STAGES = ("compact", "private")  # a fine-tuned model can be fine-tuned again: its ledger composes
ARTIFACT_TOLERANCE = 1e-6


def parse_args(argv=None):
    parser = make_parser(__doc__, "python fine_tune.py --target-epsilon 10          # <out>/compact/latest\n"
                                  "  python fine_tune.py --noise-multiplier 1.0 --accountant rdp --max-steps 200 "
                                  "--desc quick")
    group = parser.add_argument_group("input")
    group.add_argument("--generator-dir", default=None,
                       help="compact run to fine-tune (default: <out>/compact/latest)")
    add_data_args(parser, default_split="private")
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_float, default=20,
                       help="passes over the private split in expectation: epochs * N/batch D steps (may be fractional)")
    group.add_argument("--batch-size", type=positive_int, default=128, help="expected Poisson batch size")
    group.add_argument("--lr-g", type=positive_float, default=1e-4, help="Adam learning rate of the generator")
    group.add_argument("--lr-d", type=positive_float, default=2e-4, help="Adam learning rate of the discriminator")
    group.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    group.add_argument("--log-every", type=positive_int, default=50, help="D steps between metrics records")
    group.add_argument("--checkpoint-every", type=positive_int, default=500,
                       help="D steps between checkpoints (also at every epoch end)")
    add_dp_args(parser, default_target_epsilon=10.0)
    add_common_args(parser)
    add_resume_arg(parser)
    args = parser.parse_args(argv)
    if args.split != "private":
        parser.error("--split: DP fine-tuning reads only the private split (the split the guarantee is about)")
    return args


# ---------------------------------------------------------------- inputs and models

def load_parent(args) -> dict:
    path = args.generator_dir or latest_run(args.out, "compact")
    parent = load_checkpoint(path, PARENT_STAGES)
    warn_if_not_private(parent["privacy"])
    return parent


def build_models(source: dict, device):
    """The generator (compact widths and bits) and discriminator of a compact or private checkpoint; a fresh
    discriminator (seeded) when the checkpoint has none."""
    G = build_generator(source)
    if "discriminator" in source:
        D = build_discriminator(source)
    else:
        D = Discriminator(**source["model_args"].get("discriminator", {"num_classes": G.num_classes}))
    return G.to(device).train(), D.to(device).train()


def say_not_private(ledger: dict, args):
    if is_private(ledger):
        return
    own = (f"is calibrated to epsilon {args.target_epsilon} alone" if args.noise_multiplier is None
           else f"(sigma {args.noise_multiplier}) has its own epsilon in the model card")
    print(f"WARNING: the result of this run carries NO differential-privacy guarantee: an earlier stage read the "
          f"private split without DP, so the total epsilon is infinite. This stage's own DP-SGD mechanism {own}; "
          f"that bounds only what this stage adds.", file=sys.stderr)


def make_checkpoint(args, trainer: DPGANTrainer, G, parent_dir: str, split) -> dict:
    G.refresh_quant_scales()  # eval mode (and the artifact) use the scales of the weights as saved
    checkpoint = {"stage": STAGE, "args": vars(args), "parent": parent_dir,
                  "model_args": {"generator": G.model_args(), "discriminator": trainer.pd.plain.model_args()},
                  "generator": unwrapped_state_dict(G),
                  "data": {"dataset": split.dataset, "split": split.split, "size": len(split),
                           "fingerprint": split.fingerprint, "source": split.source}}
    checkpoint.update(trainer.checkpoint_state())
    return checkpoint


# ---------------------------------------------------------------- outputs

def write_figures(run_dir: str, G, device):
    z, labels = fixed_inputs(G)
    save_samples(generate(G, z, labels, device=device), os.path.join(run_dir, "samples.png"), nrow=10)
    plot_curves(read_metrics(run_dir), ["d_loss", "g_loss"], os.path.join(run_dir, "loss.png"), "DP fine-tuning")
    plot_epsilon(run_dir, "DP fine-tuning: privacy spent")


def write_device_artifacts(run_dir: str, G) -> dict:
    """The device artifact in stage 4's format (utils/deploy.py), reloaded and checked against the generator."""
    from utils import deploy
    model = build_generator({"model_args": {"generator": G.model_args()}, "generator": unwrapped_state_dict(G)})
    model.eval()
    artifact_path, program_path = os.path.join(run_dir, deploy.ARTIFACT_NAME), os.path.join(run_dir, deploy.PROGRAM_NAME)
    artifact_bytes = deploy.save_artifact(model, artifact_path)
    deploy.export_program(model, program_path)
    z, labels = model.sample_inputs(64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(z, labels)
        diffs = {"artifact": (deploy.load_artifact(artifact_path)(z, labels) - expected).abs().max().item(),
                 "program": (deploy.load_program(program_path)(z, labels) - expected).abs().max().item()}
    for name, diff in diffs.items():
        if not diff <= ARTIFACT_TOLERANCE:
            raise RuntimeError(f"the reloaded {name} differs from the fine-tuned generator by {diff:.3g}")
    return {"artifact": deploy.ARTIFACT_NAME, "artifact_bytes": artifact_bytes, "program": deploy.PROGRAM_NAME,
            "program_bytes": os.path.getsize(program_path), "max_abs_diff": diffs}


# ---------------------------------------------------------------- main

def describe_run(args) -> str:
    budget = f"sigma{args.noise_multiplier:g}" if args.noise_multiplier is not None else f"eps{args.target_epsilon:g}"
    return f"{args.dataset}-{budget}-{args.accountant}"


def prepare(args):
    """(args, run_dir, resumed checkpoint or None, metrics, source checkpoint, parent dir, ledger, split, plan).
    Every input is checked (checkpoint, dataset, partition; for a fresh run delta and budget too) before anything
    under --out is touched: a resumed run's metrics are cut back only then."""
    if args.resume:
        args, checkpoint = resume_args(args, STAGE)
        warn_if_not_private(checkpoint["privacy"])
        split = load_split(args.dataset, args.split, args.data_root, args.public_size, args.partition_seed)
        check_same_partition(checkpoint["privacy"], split)
        run_dir, metrics = start_run(args, STAGE, None, checkpoint)
        return args, run_dir, checkpoint, metrics, checkpoint, checkpoint["parent"], checkpoint["privacy"], split, None
    parent = load_parent(args)
    ledger = inherit(parent["privacy"])
    split = load_split(args.dataset, args.split, args.data_root, args.public_size, args.partition_seed)
    plan = plan_run(args, split, ledger)
    args, run_dir, _, metrics = open_run(args, STAGE, describe_run(args))
    return args, run_dir, None, metrics, parent, parent["run_dir"], ledger, split, plan


def main(args):
    if maybe_dry_run(args):
        return None
    device = resolve_device(args.device)
    args, run_dir, checkpoint, metrics, source, parent_dir, ledger, split, plan = prepare(args)
    say_not_private(ledger, args)
    set_seed(args.seed)
    G, D = build_models(source, device)
    g_optimizer = torch.optim.Adam(G.parameters(), args.lr_g, betas=(args.beta1, 0.999))
    d_optimizer = torch.optim.Adam(D.parameters(), args.lr_d, betas=(args.beta1, 0.999))
    trainer = DPGANTrainer(stage=STAGE, run_name=os.path.basename(run_dir), G=G, D=D, g_optimizer=g_optimizer,
                           d_optimizer=d_optimizer, split=split, ledger=ledger, args=args, device=device,
                           checkpoint=checkpoint, plan=plan)

    def save():
        save_run_checkpoint(run_dir, make_checkpoint(args, trainer, G, parent_dir, split))

    trainer.run(metrics, save)
    if checkpoint is not None and checkpoint["step"] == trainer.step:
        save()  # nothing left to do, but make sure `latest` points here
    write_figures(run_dir, G, device)
    artifacts = write_device_artifacts(run_dir, G)
    card = build_card(checkpoint=load_checkpoint(run_dir, STAGE), generator=G, delta=args.delta,
                      accountant=args.accountant, artifacts=artifacts)
    write_model_card(run_dir, card)
    tqdm.write(f"{STAGE}: {trainer.step} D steps; {card['privacy']['statement']}")
    tqdm.write(f"run directory {run_dir}")
    return run_dir


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
