"""Stage 3: GAN Slimming. Distil the teacher into a quantised student whose channel scales are L1-sparse.

Student loss: beta * distill(student(z, y), teacher image) + non-saturating GAN loss. The discriminator's real
samples are the stored teacher images with their labels, never the dataset, so this stage reads only generator
outputs: its privacy ledger is the distillation set's, unchanged (DESIGN sections 4 and 5). As in the GAN Slimming
release, the channel scales (BatchNorm gammas of the prunable blocks) have their own SGD optimiser and are
soft-thresholded by lr * rho after every step; a channel whose scale reaches 0 is dead for good. All other
student weights and the discriminator use Adam.
"""
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models import PRUNABLE_LAYERS, QUANT_BITS, Discriminator, Generator
from utils.checkpoint import (build_discriminator, build_generator, latest_run, load_checkpoint, read_metrics,
                              unwrapped_state_dict, write_json)
from utils.cli import (add_common_args, add_resume_arg, make_parser, nonnegative_float, positive_float,
                       positive_int, quant_bits, resolve_device, run_script, set_seed, UserError)
from utils.data import EpochBatches
from utils.distill import load_distill_set
from utils.gan import check_finite, d_loss, fixed_inputs, g_loss, generate
from utils.plots import plot_curves, sample_grid, save_side_by_side
from utils.privacy import inherit, warn_if_not_private
from utils.slimming import enforce_dead, gamma_parameters, other_parameters, proximal_step
from utils.training import batches_from, checkpoint_due, maybe_dry_run, open_run, save_run_checkpoint

STAGE = "student"
DISTILL_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}


def parse_args(argv=None):
    parser = make_parser(__doc__, "python train_student.py --epochs 20 --batch-size 128 --rho 0.01\n"
                                  "  python train_student.py --max-steps 200 --rho 0.05 --desc quick   # a quick look")
    group = parser.add_argument_group("inputs")
    group.add_argument("--distill-dir", default=None, help="distillation set (default: <out>/distill/latest)")
    group.add_argument("--teacher-dir", default=None,
                       help="teacher run, for initialisation and sample grids (default: the distillation set's "
                            "teacher, else <out>/teacher/latest)")
    group = parser.add_argument_group("student")
    group.add_argument("--quant-bits", type=quant_bits, default=QUANT_BITS, help="weight and activation bits")
    group.add_argument("--width-mult", type=positive_float, default=1.0, help="student widths = teacher's * this")
    group.add_argument("--init", choices=("auto", "teacher", "scratch"), default="auto",
                       help="student initialisation; auto = teacher when the widths match, else scratch")
    group.add_argument("--d-init", choices=("teacher", "scratch"), default="teacher", help="discriminator start")
    group.add_argument("--norm-stats", choices=("auto", "frozen", "batch"), default="auto",
                       help="BatchNorm in training: frozen = the teacher's running statistics (a fixed affine map, "
                            "so L1 on gamma prunes instead of rescaling); batch = batch statistics; "
                            "auto = frozen when initialised from the teacher")
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=20)
    group.add_argument("--batch-size", type=positive_int, default=128)
    group.add_argument("--rho", type=nonnegative_float, default=0.01, help="L1 weight on the channel scales")
    group.add_argument("--beta", type=nonnegative_float, default=20.0, help="distillation weight over the GAN loss")
    group.add_argument("--distill-loss", choices=sorted(DISTILL_LOSSES), default="l1")
    group.add_argument("--lr-g", type=positive_float, default=2e-4, help="Adam lr of the student's other weights")
    group.add_argument("--lr-gamma", type=positive_float, default=0.1, help="SGD lr of the channel scales")
    group.add_argument("--gamma-momentum", type=nonnegative_float, default=0.5, help="SGD momentum of the scales")
    group.add_argument("--lr-d", type=positive_float, default=2e-4, help="Adam lr of the discriminator")
    group.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (student and discriminator)")
    group.add_argument("--log-every", type=positive_int, default=50, help="steps between metrics records")
    group.add_argument("--checkpoint-every", type=positive_int, default=500,
                       help="steps between checkpoints (also at every epoch end)")
    add_common_args(parser)
    add_resume_arg(parser)
    return parser.parse_args(argv)


def load_inputs(args):
    """(distillation set, teacher checkpoint), checked against the flags; records the runs actually used in args
    (not `latest` links, which move)."""
    if args.distill_dir is None and not os.path.exists(latest_run(args.out, "distill")):
        raise UserError(f"no distillation set in {args.out}/distill: run create_dataset.py first or pass --distill-dir")
    distill = load_distill_set(args.distill_dir or latest_run(args.out, "distill"))
    teacher_dir = args.teacher_dir
    if teacher_dir is None:
        teacher_dir = distill.teacher_dir if os.path.exists(distill.teacher_dir) else latest_run(args.out, "teacher")
    teacher_checkpoint = load_checkpoint(teacher_dir, "teacher")
    args.distill_dir, args.teacher_dir = distill.run_dir, teacher_checkpoint["run_dir"]
    teacher_args = teacher_checkpoint["model_args"]["generator"]
    if (teacher_args["nz"], teacher_args["num_classes"]) != (distill.meta["nz"], distill.meta["num_classes"]):
        raise UserError(f"teacher {args.teacher_dir} (nz {teacher_args['nz']}, {teacher_args['num_classes']} "
                        f"classes) does not match the distillation set {args.distill_dir}")
    if len(distill) < args.batch_size:
        raise UserError(f"the distillation set has {len(distill)} samples, fewer than --batch-size {args.batch_size}")
    student_shape(args, teacher_args["channels"])
    return distill, teacher_checkpoint


def student_shape(args, teacher_channels):
    """(student widths, init): the teacher's widths scaled by --width-mult; --init auto means teacher when the
    widths match."""
    channels = [max(1, round(c * args.width_mult)) for c in teacher_channels]
    same_widths = channels == list(teacher_channels)
    init = ("teacher" if same_widths else "scratch") if args.init == "auto" else args.init
    if init == "teacher" and not same_widths:
        raise UserError(f"--init teacher needs the teacher's widths {list(teacher_channels)}, got {channels} "
                        f"(--width-mult {args.width_mult}); use --init scratch")
    return channels, init


def build_student(args, teacher):
    """The teacher's topology with `--quant-bits` layers and widths scaled by `--width-mult`."""
    channels, init = student_shape(args, teacher.channels)
    student = Generator(**{**teacher.model_args(), "channels": channels, "bits": args.quant_bits})
    if init == "teacher":
        student.load_state_dict(teacher.state_dict())
        student.refresh_quant_scales()  # the teacher's float layers never computed scales
    return student


def norm_stats_frozen(args, teacher_checkpoint) -> bool:
    if args.norm_stats == "auto":
        return student_shape(args, teacher_checkpoint["model_args"]["generator"]["channels"])[1] == "teacher"
    return args.norm_stats == "frozen"


def build_models(args, checkpoint, teacher_checkpoint):
    """Student and discriminator: fresh (seeded) or from the teacher, or the ones of the run being resumed."""
    if checkpoint is not None:
        return build_generator(checkpoint), build_discriminator(checkpoint)
    student = build_student(args, build_generator(teacher_checkpoint))
    if args.d_init == "teacher":
        return student, build_discriminator(teacher_checkpoint)
    return student, Discriminator(**teacher_checkpoint["model_args"]["discriminator"])


def make_optimizers(args, G, D) -> dict:
    return {"g": torch.optim.Adam(other_parameters(G), args.lr_g, betas=(args.beta1, 0.999)),
            "gamma": torch.optim.SGD(gamma_parameters(G), args.lr_gamma, momentum=args.gamma_momentum),
            "d": torch.optim.Adam(D.parameters(), args.lr_d, betas=(args.beta1, 0.999))}


def train_step(G, D, optimizers, batch, beta: float, rho: float, distill_loss: str = "l1") -> dict:
    """One discriminator and one student update on a batch (z, labels, teacher images), then the L1 proximal
    step on the channel scales and the pinning of dead channels."""
    z, labels, target = batch
    fake = G(z, labels)
    optimizers["d"].zero_grad(set_to_none=True)
    discriminator_loss = d_loss(D(target, labels), D(fake.detach(), labels))  # teacher images are the real ones
    discriminator_loss.backward()
    optimizers["d"].step()

    distill = DISTILL_LOSSES[distill_loss](fake, target)
    adversarial = g_loss(D(fake, labels))
    optimizers["g"].zero_grad(set_to_none=True)
    optimizers["gamma"].zero_grad(set_to_none=True)
    (beta * distill + adversarial).backward()
    optimizers["g"].step()
    optimizers["gamma"].step()
    proximal_step(G, optimizers["gamma"].param_groups[0]["lr"], rho)
    enforce_dead(G, (optimizers["g"], optimizers["gamma"]))
    return {"d_loss": discriminator_loss.item(), "g_loss": adversarial.item(), "distill_loss": distill.item()}


def make_checkpoint(args, G, D, optimizers, step, ledger):
    G.refresh_quant_scales()  # eval mode uses the stored scales: make them match the saved weights
    return {"stage": STAGE, "step": step, "args": vars(args), "parent": args.distill_dir,
            "teacher": args.teacher_dir,
            "model_args": {"generator": G.model_args(), "discriminator": D.model_args()},
            "generator": unwrapped_state_dict(G), "discriminator": unwrapped_state_dict(D),
            "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
            "rng": {"torch": torch.get_rng_state()}, "privacy": ledger}


@torch.no_grad()
def eval_distill_loss(G, distill, args, device, count: int = 2000) -> float:
    """Distillation loss in eval mode (stored quantisation scales, BatchNorm running stats) on the set's start."""
    z, labels, target = distill.batch(range(min(count, len(distill))))
    fake = generate(G, z, labels, batch_size=args.batch_size, device=device)
    return DISTILL_LOSSES[args.distill_loss](fake, target).item()


def write_reports(run_dir, G, teacher, distill, args, device) -> dict:
    """samples.png (teacher | student on fixed inputs), loss.png, sparsity.png and summary.json."""
    G.refresh_quant_scales()
    z, labels = fixed_inputs(G)
    active, total = G.active_channels(), list(G.channels)
    grids = {"teacher (float)": sample_grid(generate(teacher.to(device), z, labels, device=device), nrow=10),
             f"student ({G.bits}-bit, {sum(active)}/{sum(total)} channels)":
                 sample_grid(generate(G, z, labels, device=device), nrow=10)}
    save_side_by_side(grids, os.path.join(run_dir, "samples.png"), "same z and labels")
    records = read_metrics(run_dir)
    plot_curves(records, ["d_loss", "g_loss", "distill_loss"], os.path.join(run_dir, "loss.png"), "student losses")
    layers = [{"step": r["step"], **dict(zip(PRUNABLE_LAYERS, r["active_channels"]))}
              for r in records if "active_channels" in r]
    plot_curves(layers, PRUNABLE_LAYERS, os.path.join(run_dir, "sparsity.png"), "live channels per layer",
                ylabel="active channels")
    summary = {"active_channels": dict(zip(PRUNABLE_LAYERS, active)), "channels": dict(zip(PRUNABLE_LAYERS, total)),
               "bits": G.bits, f"eval_{args.distill_loss}_distill_loss": eval_distill_loss(G, distill, args, device)}
    write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary


def train(args, run_dir, checkpoint, metrics, inputs, device):
    distill, teacher_checkpoint = inputs
    set_seed(args.seed)
    G, D = (m.to(device) for m in build_models(args, checkpoint, teacher_checkpoint))
    G.frozen_norm_stats = norm_stats_frozen(args, teacher_checkpoint)
    G.train()
    optimizers = make_optimizers(args, G, D)
    step, ledger = 0, inherit(distill.ledger)  # generator outputs only: post-processing, nothing appended
    if checkpoint is not None:
        for name, opt in optimizers.items():
            opt.load_state_dict(checkpoint["optimizers"][name])
        step, ledger = checkpoint["step"], checkpoint["privacy"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
    warn_if_not_private(ledger)
    batches = EpochBatches(distill, args.batch_size, args.seed)
    total = args.epochs * len(batches) if args.max_steps is None else min(args.max_steps, args.epochs * len(batches))

    def save():
        save_run_checkpoint(run_dir, make_checkpoint(args, G, D, optimizers, step, ledger))

    if step == 0:
        metrics.append(step=0, active_channels=G.active_channels())
    progress = tqdm(total=total, initial=step, desc="student", dynamic_ncols=True)
    for epoch, batch in batches_from(batches, step, total):
        losses = train_step(G, D, optimizers, [t.to(device) for t in batch], args.beta, args.rho, args.distill_loss)
        check_finite(step + 1, **losses)
        step += 1
        progress.update(1)
        progress.set_postfix(epoch=epoch, distill=f"{losses['distill_loss']:.3f}", active=sum(G.active_channels()))
        if step % args.log_every == 0 or step == total:
            metrics.append(step=step, epoch=epoch, **losses, active_channels=G.active_channels())
        if checkpoint_due(step, total, len(batches), args.checkpoint_every):
            save()
    progress.close()
    if checkpoint is not None and checkpoint["step"] == step:
        save()  # nothing left to do, but make sure `latest` points here
    summary = write_reports(run_dir, G, build_generator(teacher_checkpoint), distill, args, device)
    tqdm.write(f"student: {step} steps, active channels {summary['active_channels']}, run directory {run_dir}")
    return run_dir


def main(args):
    inputs = None if args.resume else load_inputs(args)  # resolved before args.json is written
    if maybe_dry_run(args):
        return None
    device = resolve_device(args.device)
    args, run_dir, checkpoint, metrics = open_run(args, STAGE, f"b{args.quant_bits}-rho{args.rho:g}")
    return train(args, run_dir, checkpoint, metrics, inputs or load_inputs(args), device)


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
