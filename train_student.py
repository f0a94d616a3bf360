"""Stage 3: GAN Slimming. Distil the teacher into a quantised student whose channel scales are L1-sparse.

Student loss: beta * distill(student(z, y), teacher image) + non-saturating GAN loss. The discriminator's real
samples are the stored teacher images with their labels, never the dataset, so this stage reads only generator
outputs: its privacy ledger is the distillation set's, unchanged (docs/DESIGN.md, "Privacy"). As in the GAN Slimming
release, the channel scales (BatchNorm gammas of the prunable blocks) have their own SGD optimiser and are
soft-thresholded by lr * rho after every step (`--penalty cost`: lr * rho times the channel's share of the
parameters and MACs, mean 1); a channel whose scale reaches 0 is dead for good. All other student weights and the
discriminator use Adam.
"""
import os

import torch

from models import QUANT_BITS, Discriminator, Generator
from utils.compression.slimming import (DISTILL_LOSSES, PENALTIES, SlimmingConfig, SlimmingStep, eval_distill_loss,
                                        gamma_parameters, other_parameters)
from utils.data.datasets import EpochBatches
from utils.data.distill import load_distill_set
from utils.evaluation.plots import plot_curves, plot_losses, side_by_side_samples
from utils.gan.recipe import Recipe, RecipeConfig, add_recipe_args
from utils.privacy.ledger import inherit, warn_if_not_private
from utils.run.checkpoint import build_discriminator, build_generator, input_run, lineage, load_checkpoint, read_metrics
from utils.run.cli import (UserError, add_common_args, add_input_arg, add_resume_arg, add_snapshot_arg, make_parser,
                           nonnegative_float, positive_float, positive_int, quant_bits, run_script, set_seed)
from utils.run.distributed import ShardedBatches, check_divisible, data_parallel, distributed, is_writer
from utils.run.files import write_json
from utils.run.lifecycle import Run, TrainConfig, maybe_dry_run, resume_args
from utils.run.precision import add_precision_arg, announce, resolve_precision
from utils.run.trainer import Trainer

STAGE = "student"
# The runs this stage reads, editable here: None means <out>/distill/latest, and for the teacher the distillation
# set's own teacher (else <out>/teacher/latest). --distill-dir and --teacher-dir override these.
DISTILL_DIR = None
TEACHER_DIR = None


def parse_args(argv=None):
    parser = make_parser(__doc__, "python train_student.py --epochs 20 --batch-size 128 --rho 0.01\n"
                                  "  python train_student.py --max-steps 200 --rho 0.05 --desc quick   # a quick look")
    group = parser.add_argument_group("inputs")
    add_input_arg(group, "--distill-dir", "DISTILL_DIR", "distillation set", "<out>/distill/latest")
    add_input_arg(group, "--teacher-dir", "TEACHER_DIR", "teacher run, for initialisation and sample grids",
                  "the distillation set's teacher, else <out>/teacher/latest")
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
    group.add_argument("--penalty", choices=PENALTIES, default="uniform",
                       help="L1 weight per channel: uniform (GAN Slimming), or cost: by the parameters and MACs "
                            "the channel carries")
    group.add_argument("--lr-g", type=positive_float, default=2e-4, help="Adam lr of the student's other weights")
    group.add_argument("--lr-gamma", type=positive_float, default=0.1, help="SGD lr of the channel scales")
    group.add_argument("--gamma-momentum", type=nonnegative_float, default=0.5, help="SGD momentum of the scales")
    group.add_argument("--lr-d", type=positive_float, default=2e-4, help="Adam lr of the discriminator")
    group.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (student and discriminator)")
    add_precision_arg(group)
    group.add_argument("--log-every", type=positive_int, default=50, help="steps between metrics records")
    group.add_argument("--checkpoint-every", type=positive_int, default=500,
                       help="steps between checkpoints (also at every epoch end)")
    add_snapshot_arg(group)
    add_recipe_args(parser, averaging=False)
    add_common_args(parser)
    add_resume_arg(parser)
    return parser.parse_args(argv)


def load_inputs(args):
    """(distillation set, teacher checkpoint), checked against the flags; records the runs actually used in args
    (not `latest` links, which move)."""
    distill_path = input_run(args.distill_dir, DISTILL_DIR, args.out, "distill")
    if not (args.distill_dir or DISTILL_DIR or os.path.exists(distill_path)):
        raise UserError(f"no distillation set in {args.out}/distill: run create_dataset.py first or pass --distill-dir")
    distill = load_distill_set(distill_path)
    teacher_dir = args.teacher_dir or TEACHER_DIR or lineage(load_checkpoint(distill.run_dir, "distill"))["teacher"]
    teacher_checkpoint = load_checkpoint(teacher_dir or input_run(None, None, args.out, "teacher"), "teacher")
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


def write_reports(run_dir, G, teacher, distill, args, device) -> dict:
    """samples.png (teacher | student on fixed inputs), loss.png, sparsity.png and summary.json."""
    G.refresh_quant_scales()
    active, total = G.active_channels(), list(G.channels)
    side_by_side_samples({"teacher (float)": teacher, f"student ({G.bits}-bit, {sum(active)}/{sum(total)} "
                          f"channels)": G}, os.path.join(run_dir, "samples.png"), "same z and labels", device)
    plot_losses(run_dir, ["d_loss", "g_loss", "distill_loss"], "student losses")
    layers = [{"step": r["step"], **dict(zip(G.prunable_layers, r["active_channels"]))}
              for r in read_metrics(run_dir) if "active_channels" in r]
    plot_curves(layers, G.prunable_layers, os.path.join(run_dir, "sparsity.png"), "live channels per layer",
                ylabel="active channels")
    summary = {"active_channels": dict(zip(G.prunable_layers, active)),
               "channels": dict(zip(G.prunable_layers, total)),
               "bits": G.bits, f"eval_{args.distill_loss}_distill_loss": eval_distill_loss(G, distill, args.distill_loss,
                                                                                args.batch_size, device)}
    write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary


def make_step(args, run: Run, distill, teacher_checkpoint, device, precision) -> SlimmingStep:
    G, D = (m.to(device) for m in build_models(args, run.checkpoint, teacher_checkpoint))
    G.frozen_norm_stats = norm_stats_frozen(args, teacher_checkpoint)
    G.train()
    optimizers = make_optimizers(args, G, D)
    data_parallel([G, D], list(optimizers.values()))
    # generator outputs only: post-processing, nothing appended to the ledger
    ledger = run.checkpoint["privacy"] if run.checkpoint is not None else inherit(distill.ledger)
    warn_if_not_private(ledger)
    batches = ShardedBatches(EpochBatches(distill, args.batch_size, args.seed))  # this rank's part of each batch
    return SlimmingStep(G, D, optimizers, batches, args.epochs, ledger, SlimmingConfig.from_args(args), device,
                        Recipe(RecipeConfig.from_args(args), G, args.seed), precision)


def main(args):
    inputs = None if args.resume else load_inputs(args)  # resolved before args.json is written
    if maybe_dry_run(args):
        return None
    with distributed(args.device) as device:  # under torchrun: this process's part of the group
        return train_stage(args, inputs, device)


def train_stage(args, inputs, device):
    """From the resumed or new run to its reports, in one process or as one rank of the torchrun group."""
    args, checkpoint = resume_args(args, STAGE)
    precision = resolve_precision(getattr(args, "precision", None), device).for_use("student")
    check_divisible(args.batch_size)
    distill, teacher_checkpoint = inputs or load_inputs(args)
    penalty = "-cost" if getattr(args, "penalty", "uniform") == "cost" else ""
    run = Run.open(args, STAGE, f"b{args.quant_bits}-rho{args.rho:g}{penalty}", checkpoint)
    set_seed(args.seed)
    step = make_step(args, run, distill, teacher_checkpoint, device, precision)
    if is_writer():
        announce(precision, STAGE)
    steps = Trainer(step, run, TrainConfig.from_args(args), args=args, parent=args.distill_dir,
                    extra={"teacher": args.teacher_dir, "precision": precision.describe()}).fit()
    if not is_writer():
        return run.run_dir
    summary = write_reports(run.run_dir, step.generator, build_generator(teacher_checkpoint), distill, args, device)
    return run.finish(f"{steps} steps, active channels {summary['active_channels']}")


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
