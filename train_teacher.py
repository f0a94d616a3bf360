"""Stage 1: train the large float teacher generator (and its discriminator) on one split of the dataset.

The checkpoint's privacy ledger records a non-DP read of the private split when --split is private or all
(the final epsilon is then infinite); --split public (the default) reads only the public part of the partition.
With --dp (and --split private) the teacher is trained on the private split under DP-SGD on the discriminator
(utils/privacy/dp.py, as in fine_tune.py): the ledger records the mechanism instead, and DP fine-tuning composes with
it. --subset N trains on a seeded draw of N images of the split only (--seed; recorded in the checkpoint's data entry
and the ledger): `--split private --subset 500` for many epochs is the membership audit's positive control, a
model that must leak (evaluate.py takes its members from exactly those images).
--dp-d-channels C ... (non-private only) trains a second, narrow discriminator beside D on the same batches, saved
for the DP stage (`train_student.py --d-init teacher-dp`); it changes nothing else (docs/DESIGN.md, "The training
loop").
"""
import os

import torch

from models import Discriminator, Generator
from utils.data.datasets import (EpochBatches, add_data_args, check_data_fits, image_request, load_split, model_shape,
                                 seeded_subset)
from utils.evaluation.plots import save_training_figures
from utils.gan.recipe import TEACHER_EMA_DECAY, Recipe, RecipeConfig, add_recipe_args, check_recipe_args
from utils.gan.steps import NonPrivateStep
from utils.privacy.dp import DPConfig, DPStep, add_dp_args, plan_for
from utils.privacy.ledger import new_ledger, record_data_read, warn_if_not_private
from utils.run.checkpoint import DP_DISCRIMINATOR, build_discriminator, build_generator, data_fields
from utils.run.cli import (UserError, add_common_args, add_resume_arg, add_snapshot_arg, make_parser, nonnegative_int,
                           positive_float, positive_int, run_script, set_seed)
from utils.run.distributed import ShardedBatches, check_divisible, data_parallel, distributed, is_writer
from utils.run.lifecycle import Run, TrainConfig, maybe_dry_run, resume_args
from utils.run.precision import add_precision_arg, announce, resolve_precision
from utils.run.trainer import Trainer

STAGE = "teacher"
# The non-private teacher's discriminator when --d-channels is not given, by image side: the recipe measured at 8,000
# steps (benchmarks/results/recipe.md, "The teacher's recipe at 8,000 steps"; docs/DESIGN.md): Bie et al.'s widths
# 128/256/512 (one more strided conv) scored 84.4 % under the published protocol against 80.3 % for 64/128. Sides
# not measured, and every DP discriminator (its noise grows with its parameters; not measured), keep the model's
# default (models.shapes.DEFAULT_DISCRIMINATOR_CHANNELS).
NON_PRIVATE_D_CHANNELS = {28: (128, 256, 512)}
# --dp-d-channels: the narrow discriminator's initial weights come from this offset of --seed, drawn on a stream of
# their own, so that G, D and every later draw are those of the run without it
DP_DISCRIMINATOR_SEED_OFFSET = 7919


def parse_args(argv=None):
    parser = make_parser(__doc__, "python train_teacher.py --epochs 30 --batch-size 128 --split public\n"
                                  "  python train_teacher.py --max-steps 200 --desc quick   # a quick look\n"
                                  "  python train_teacher.py --dp --split private --target-epsilon 5   # DP teacher")
    add_data_args(parser, default_split="public")
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=30)
    group.add_argument("--batch-size", type=positive_int, default=128)
    group.add_argument("--lr", type=positive_float, default=2e-4, help="Adam learning rate of G (and of D)")
    group.add_argument("--lr-d", type=positive_float, default=None, help="Adam learning rate of D (default: --lr)")
    group.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    group.add_argument("--beta2", type=float, default=0.999, help="Adam beta2")
    group.add_argument("--g-channels", type=positive_int, nargs="+", default=None,
                       help="generator widths, one per block; default for 28 px: 256 128 64 (7, 14, 28), 32 px: "
                            "512 256 128 64 (4, 8, 16, 32), 64 px: 512 256 128 64 32 (4, 8, 16, 32, 64)")
    group.add_argument("--d-channels", type=positive_int, nargs="+", default=None,
                       help="discriminator widths, one per halving of the image, or one more for an extra strided "
                            "3x3 conv; default for 28 px: 128 256 512 (Bie et al.'s DCGAN discriminator; with --dp: "
                            "64 128), 32 px: 64 128 256, 64 px: 32 64 128 256")
    group.add_argument("--minibatch-std", type=nonnegative_int, default=0, metavar="G",
                       help="StyleGAN's minibatch standard deviation feature over groups of G samples before D's "
                            "logit (0: off); non-private training only: it mixes samples, which DP-SGD cannot train")
    group.add_argument("--dp-d-channels", type=positive_int, nargs="+", default=None, metavar="C",
                       help="also train a narrow discriminator of these widths (seeded, no minibatch std layer) "
                            "beside D on the same real batches and fakes, with its own Adam: it never feeds the "
                            "generator's loss and changes nothing else; the DP stage's start via train_student.py "
                            "--d-init teacher-dp (e.g. 64 128 under the 128/256/512 default; non-private only)")
    group.add_argument("--nz", type=positive_int, default=100, help="latent dimension")
    group.add_argument("--subset", type=positive_int, default=None, metavar="N",
                       help="train on a seeded draw (--seed) of N images of the split only, recorded in the "
                            "checkpoint and the ledger (e.g. --split private --subset 500: a model that leaks)")
    group.add_argument("--log-every", type=positive_int, default=50, help="steps between metrics records")
    group.add_argument("--checkpoint-every", type=positive_int, default=500,
                       help="steps between checkpoints (also at every epoch end)")
    add_snapshot_arg(group)
    add_precision_arg(group)
    group.add_argument("--dp", action="store_true",
                       help="train on the private split with DP-SGD on the discriminator (needs --split private)")
    add_dp_args(parser, default_target_epsilon=5.0)
    add_recipe_args(parser, ema_decay=TEACHER_EMA_DECAY, ema_help=" (measured with and without --dp: docs/RESULTS.md)")
    add_common_args(parser)
    add_resume_arg(parser)
    args = parser.parse_args(argv)
    check_recipe_args(parser, args)
    return args


def build_models(args, checkpoint, split):
    """Fresh G and D (seeded) for the data's size, colour and classes, or the ones of the run being resumed (G:
    the trained weights, not the weight average that the checkpoint's "generator" holds when there is one)."""
    if checkpoint is not None:
        G = build_generator(checkpoint)
        if "generator_live" in checkpoint:
            G.load_state_dict(checkpoint["generator_live"])
        return G, build_discriminator(checkpoint)
    minibatch_std = getattr(args, "minibatch_std", 0)
    try:
        return (Generator(nz=args.nz, channels=args.g_channels, bits=32, **model_shape(split)),
                Discriminator(channels=discriminator_widths(args, split), minibatch_std=minibatch_std,
                              **model_shape(split)))
    except ValueError as exc:
        raise UserError(f"--g-channels/--d-channels: {exc}") from exc


def build_dp_discriminator(args, checkpoint, split):
    """The narrow discriminator of --dp-d-channels (None without it): the resumed run's, or a fresh one seeded
    from --seed + DP_DISCRIMINATOR_SEED_OFFSET inside a forked random state (the global state after it is the one
    before), never with a minibatch std layer (the DP stage's DP-SGD will train it)."""
    if checkpoint is not None:
        return build_discriminator(checkpoint, DP_DISCRIMINATOR) if DP_DISCRIMINATOR in checkpoint else None
    widths = getattr(args, "dp_d_channels", None)  # getattr: runs saved before the option resume without it
    if not widths:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + DP_DISCRIMINATOR_SEED_OFFSET)
        try:
            return Discriminator(channels=widths, minibatch_std=0, **model_shape(split))
        except ValueError as exc:
            raise UserError(f"--dp-d-channels: {exc}") from exc


def discriminator_widths(args, split):
    """--d-channels, else the non-private teacher's measured default for this image side (NON_PRIVATE_D_CHANNELS),
    else None: the model's default."""
    if args.d_channels or args.dp:
        return args.d_channels
    return NON_PRIVATE_D_CHANNELS.get(model_shape(split)["image_size"])


def load_data(args, checkpoint):
    """The training split, read at the shape of the run being resumed (and checked against it), else as asked;
    widths that do not fit the data are refused here, before a run directory exists."""
    built_for = checkpoint["model_args"]["generator"] if checkpoint is not None else None
    split = load_split(args.dataset, args.split, args.data_root, args.public_size, args.partition_seed,
                       image_request(args, built_for))
    if getattr(args, "subset", None):  # getattr: the saved args of a run from before --subset have none
        split = seeded_subset(split, args.subset, args.seed)
    if checkpoint is not None:
        check_data_fits(split, built_for)
    else:
        build_models(args, None, split)
        build_dp_discriminator(args, None, split)
    return split


def make_step(args, run: Run, split, ledger: dict, plan, device, precision):
    """The non-private step (its forward passes in `precision`), or with --dp the DP step (float32; the ledger
    records the mechanism, not a data read)."""
    G, D = (model.to(device) for model in build_models(args, run.checkpoint, split))
    narrow = None if args.dp else build_dp_discriminator(args, run.checkpoint, split)
    betas = (args.beta1, getattr(args, "beta2", 0.999))  # getattr: runs saved before --beta2 and --lr-d resume
    lr_d = getattr(args, "lr_d", None) or args.lr
    optimizers = {"g": torch.optim.Adam(G.parameters(), args.lr, betas=betas),
                  "d": torch.optim.Adam(D.parameters(), lr_d, betas=betas)}
    if narrow is not None:
        narrow = narrow.to(device)
        optimizers["dp_d"] = torch.optim.Adam(narrow.parameters(), lr_d, betas=betas)  # D's settings
    data_parallel([G, D] + ([narrow] if narrow is not None else []),
                  [optimizers["g"]] if args.dp else list(optimizers.values()))
    train = TrainConfig.from_args(args)
    config = DPConfig.from_args(args)
    if args.dp:
        # a run saved before the average was the --dp default has ema_decay None: it resumes without one
        recipe = Recipe(RecipeConfig.from_args(args, d_steps=config.d_steps_per_g_step, ema_decay=0.0), G, args.seed)
        return DPStep(G, D, optimizers, split, ledger, plan, config, train, run, recipe=recipe)
    if run.checkpoint is None:
        record_data_read(ledger, STAGE, split.split, len(split), os.path.basename(run.run_dir), split.subset)
    warn_if_not_private(ledger)
    batches = ShardedBatches(EpochBatches(split, args.batch_size, args.seed))  # this rank's part of each batch
    recipe = Recipe(RecipeConfig.from_args(args, ema_decay=TEACHER_EMA_DECAY), G, args.seed)
    return NonPrivateStep(G, D, optimizers, batches, args.epochs, ledger, args.seed, device, recipe,
                          precision.for_use("teacher"), narrow)


def main(args):
    if args.dp and args.split != "private":
        raise UserError("--dp trains the teacher on the private split under DP-SGD: add --split private")
    if args.dp and (args.loss != "non-saturating" or args.augment != "none"):
        raise UserError("--loss and --augment apply to non-private training only; the DP discriminator step keeps "
                        "the non-saturating loss without augmentation")
    if args.dp and args.minibatch_std:
        raise UserError("--minibatch-std applies to non-private training only: the layer mixes samples, so DP-SGD "
                        "cannot train a discriminator that has it")
    if args.dp and args.dp_d_channels:
        raise UserError("--dp-d-channels applies to the non-private teacher only: with --dp the teacher's own "
                        "discriminator is the DP-trained one")
    if maybe_dry_run(args):
        return None
    with distributed(args.device) as device:  # under torchrun: this process's part of the group
        return train_stage(args, device)


def train_stage(args, device):
    """From the resumed or new run to its figures, in one process or as one rank of the torchrun group."""
    args, checkpoint = resume_args(args, STAGE)
    precision = resolve_precision(getattr(args, "precision", None), device, allowed=not args.dp,
                                  why_not="the DP paths stay float32")
    if not args.dp:
        check_divisible(args.batch_size)
    split = load_data(args, checkpoint)
    ledger = checkpoint["privacy"] if checkpoint is not None else new_ledger(split.partition)
    plan = plan_for(checkpoint, DPConfig.from_args(args), TrainConfig.from_args(args), split, ledger) \
        if args.dp else None
    desc = f"{args.dataset}-{args.split}" + (f"-subset{args.subset}" if getattr(args, "subset", None) else "")
    run = Run.open(args, STAGE, desc + ("-dp" if args.dp else ""), checkpoint)
    set_seed(args.seed)
    step = make_step(args, run, split, ledger, plan, device, precision)
    if is_writer():
        announce(precision.for_use("teacher"), STAGE)
    steps = Trainer(step, run, TrainConfig.from_args(args), args=args, data=data_fields(split),
                    extra={"precision": precision.for_use("teacher").describe()}).fit()
    if is_writer():
        save_training_figures(run.run_dir, step.sampling_generator(), "DP teacher" if args.dp else "teacher losses",
                              device, private=args.dp)
    return run.finish(f"{steps} {'DP discriminator ' if args.dp else ''}steps")


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
