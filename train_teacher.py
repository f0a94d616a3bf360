"""Stage 1: train the large float teacher generator (and its discriminator) on one split of the dataset.

The checkpoint's privacy ledger records a non-DP read of the private split when --split is private or all
(the final epsilon is then infinite); --split public (the default) reads only the public part of the partition.
With --dp (and --split private) the teacher is trained on the private split under DP-SGD on the discriminator
(utils/dp.py, as in fine_tune.py): the ledger records the mechanism instead, and DP fine-tuning composes with it.
"""
import os

import torch
from tqdm import tqdm

from models import Discriminator, Generator
from utils.checkpoint import build_discriminator, build_generator, read_metrics, unwrapped_state_dict
from utils.cli import (UserError, add_common_args, add_resume_arg, make_parser, positive_float, positive_int,
                       resolve_device, run_script, set_seed)
from utils.data import EpochBatches, add_data_args, load_split
from utils.dp import DPGANTrainer, add_dp_args, plan_run, plot_epsilon
from utils.gan import check_finite, discriminator_step, fixed_inputs, generate, generator_step
from utils.plots import plot_curves, save_samples
from utils.privacy import check_same_partition, new_ledger, record_data_read, warn_if_not_private
from utils.training import (batches_from, checkpoint_due, maybe_dry_run, resume_args, rng_from,
                            save_run_checkpoint, start_run)

STAGE = "teacher"


def parse_args(argv=None):
    parser = make_parser(__doc__, "python train_teacher.py --epochs 30 --batch-size 128 --split public\n"
                                  "  python train_teacher.py --max-steps 200 --desc quick   # a quick look\n"
                                  "  python train_teacher.py --dp --split private --target-epsilon 5   # DP teacher")
    add_data_args(parser, default_split="public")
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=30)
    group.add_argument("--batch-size", type=positive_int, default=128)
    group.add_argument("--lr", type=positive_float, default=2e-4, help="Adam learning rate of G and D")
    group.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    group.add_argument("--g-channels", type=positive_int, nargs=3, default=[256, 128, 64],
                       help="generator widths of the 7x7, 14x14 and 28x28 blocks")
    group.add_argument("--d-channels", type=positive_int, nargs=2, default=[64, 128], help="discriminator widths")
    group.add_argument("--nz", type=positive_int, default=100, help="latent dimension")
    group.add_argument("--log-every", type=positive_int, default=50, help="steps between metrics records")
    group.add_argument("--checkpoint-every", type=positive_int, default=500,
                       help="steps between checkpoints (also at every epoch end)")
    group.add_argument("--dp", action="store_true",
                       help="train on the private split with DP-SGD on the discriminator (needs --split private)")
    add_dp_args(parser, default_target_epsilon=5.0)
    add_common_args(parser)
    add_resume_arg(parser)
    return parser.parse_args(argv)


def build_models(args, checkpoint, num_classes: int):
    """Fresh G and D (seeded), or the ones saved in the checkpoint being resumed."""
    if checkpoint is not None:
        return build_generator(checkpoint), build_discriminator(checkpoint)
    return (Generator(nz=args.nz, num_classes=num_classes, channels=args.g_channels, bits=32),
            Discriminator(num_classes=num_classes, channels=args.d_channels))


def make_checkpoint(args, G, D, optimizers, step, rng, ledger, split):
    return {"stage": STAGE, "step": step, "args": vars(args), "parent": None,
            "model_args": {"generator": G.model_args(), "discriminator": D.model_args()},
            "generator": unwrapped_state_dict(G), "discriminator": unwrapped_state_dict(D),
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "rng": {"train": rng.get_state()}, "privacy": ledger,
            "data": {"dataset": split.dataset, "split": split.split, "size": len(split),
                     "fingerprint": split.fingerprint, "source": split.source}}


def write_figures(run_dir, G, device):
    z, labels = fixed_inputs(G)
    save_samples(generate(G, z, labels, device=device), os.path.join(run_dir, "samples.png"), nrow=10)
    plot_curves(read_metrics(run_dir), ["d_loss", "g_loss"], os.path.join(run_dir, "loss.png"), "teacher losses")


def train(args, run_dir, checkpoint, metrics, split, device, plan=None):
    set_seed(args.seed)
    G, D = (m.to(device) for m in build_models(args, checkpoint, num_classes=10))
    optimizers = {"g": torch.optim.Adam(G.parameters(), args.lr, betas=(args.beta1, 0.999)),
                  "d": torch.optim.Adam(D.parameters(), args.lr, betas=(args.beta1, 0.999))}
    if getattr(args, "dp", False):
        return train_private(args, run_dir, checkpoint, metrics, split, G, D, optimizers, device, plan)
    step, ledger = 0, new_ledger(split.partition)
    if checkpoint is not None:
        for name, opt in optimizers.items():
            opt.load_state_dict(checkpoint["optimizers"][name])
        step, ledger = checkpoint["step"], checkpoint["privacy"]
    else:
        record_data_read(ledger, STAGE, split.split, len(split), run=os.path.basename(run_dir))
    warn_if_not_private(ledger)
    rng = rng_from(checkpoint, "train", args.seed)
    batches = EpochBatches(split, args.batch_size, args.seed)
    total = args.epochs * len(batches) if args.max_steps is None else min(args.max_steps, args.epochs * len(batches))

    def save():
        save_run_checkpoint(run_dir, make_checkpoint(args, G, D, optimizers, step, rng, ledger, split))

    progress = tqdm(total=total, initial=step, desc="teacher", dynamic_ncols=True)
    for epoch, (real, labels) in batches_from(batches, step, total):
        real, labels = real.to(device), labels.to(device)
        d_value = discriminator_step(G, D, optimizers["d"], real, labels, rng)
        g_value = generator_step(G, D, optimizers["g"], len(real), rng, device)
        check_finite(step + 1, d_loss=d_value, g_loss=g_value)
        step += 1
        progress.update(1)
        progress.set_postfix(epoch=epoch, d_loss=f"{d_value:.3f}", g_loss=f"{g_value:.3f}")
        if step % args.log_every == 0 or step == total:
            metrics.append(step=step, epoch=epoch, d_loss=d_value, g_loss=g_value)
        if checkpoint_due(step, total, len(batches), args.checkpoint_every):
            save()
    progress.close()
    if checkpoint is not None and checkpoint["step"] == step:
        save()  # nothing left to do, but make sure `latest` points here
    write_figures(run_dir, G, device)
    tqdm.write(f"teacher: {step} steps, run directory {run_dir}")
    return run_dir


def train_private(args, run_dir, checkpoint, metrics, split, G, D, optimizers, device, plan=None):
    """--dp: the DP GAN loop of utils/dp.py; the ledger records the DP-SGD mechanism, not a data read."""
    ledger = checkpoint["privacy"] if checkpoint is not None else new_ledger(split.partition)
    trainer = DPGANTrainer(stage=STAGE, run_name=os.path.basename(run_dir), G=G, D=D, g_optimizer=optimizers["g"],
                           d_optimizer=optimizers["d"], split=split, ledger=ledger, args=args, device=device,
                           checkpoint=checkpoint, plan=plan)

    def save():
        state = make_checkpoint(args, G, D, optimizers, trainer.step, trainer.rng, ledger, split)
        save_run_checkpoint(run_dir, {**state, **trainer.checkpoint_state()})

    trainer.run(metrics, save)
    if checkpoint is not None and checkpoint["step"] == trainer.step:
        save()
    write_figures(run_dir, G, device)
    plot_epsilon(run_dir, "DP teacher: privacy spent")
    tqdm.write(f"teacher: {trainer.step} DP discriminator steps, run directory {run_dir}")
    return run_dir


def main(args):
    desc = f"{args.dataset}-{args.split}" + ("-dp" if args.dp else "")
    if args.dp and args.split != "private":
        raise UserError("--dp trains the teacher on the private split under DP-SGD: add --split private")
    if maybe_dry_run(args):
        return None
    device = resolve_device(args.device)
    args, checkpoint = resume_args(args, STAGE)
    split = load_split(args.dataset, args.split, args.data_root, args.public_size, args.partition_seed)
    plan = plan_run(args, split, new_ledger(split.partition)) if args.dp and checkpoint is None else None
    if args.dp and checkpoint is not None:
        check_same_partition(checkpoint["privacy"], split)  # refused before the resumed metrics are cut back
    run_dir, metrics = start_run(args, STAGE, desc, checkpoint)  # only now, once the input is known to be good
    return train(args, run_dir, checkpoint, metrics, split, device, plan)


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
