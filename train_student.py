"""Stage 3: GAN Slimming. Distil the teacher into a quantised student whose channel scales are L1-sparse.

Student loss: beta * distill(student(z, y), teacher image) + non-saturating GAN loss. The discriminator's real
samples are the stored teacher images with their labels, never the dataset, so this stage reads only generator
outputs: its privacy ledger is the distillation set's, unchanged (docs/DESIGN.md, "Privacy"). As in the GAN Slimming
release, the channel scales (BatchNorm gammas of the prunable blocks) have their own SGD optimiser and are
soft-thresholded by lr * rho after every step (`--penalty cost`: lr * rho times the channel's share of the
parameters and MACs, mean 1; `--penalty params`: of the parameters only); a channel whose scale reaches 0 is dead for
good. All other student weights and the discriminator use Adam. The discriminator starts as the teacher's, or with
`--d-channels` as a fresh one of those widths, or with `--d-init teacher-dp` as the narrow one the teacher trained
beside its own (`train_teacher.py --dp-d-channels`): the compact run carries it and the DP stage trains it, so a wide
teacher's discriminator need not be the one DP-SGD trains (docs/DESIGN.md, "GAN Slimming and compression").

Recovery phase (`--init-student RUN`, typically with `--rho 0`): the student starts from another student run of the
same teacher as it ended (weights, channel scales, BatchNorm statistics and mode, dead channels, which stay dead),
with its widths, bits and discriminator (with `--d-channels`, a fresh one instead); optimiser state starts afresh.
"""
import argparse
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
from utils.run.checkpoint import (DP_DISCRIMINATOR, build_discriminator, build_generator, input_run, lineage,
                                  load_checkpoint, read_metrics)
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
# The student run a recovery phase starts from (--init-student): None means none, the student starts from the teacher.
INIT_STUDENT = None


def parse_args(argv=None):
    parser = make_parser(__doc__, "python train_student.py --epochs 20 --batch-size 128 --rho 0.01\n"
                                  "  python train_student.py --max-steps 200 --rho 0.05 --desc quick   # a quick look")
    group = parser.add_argument_group("inputs")
    add_input_arg(group, "--distill-dir", "DISTILL_DIR", "distillation set",
                  "the --init-student run's own, else <out>/distill/latest")
    add_input_arg(group, "--teacher-dir", "TEACHER_DIR", "teacher run, for initialisation and sample grids",
                  "the distillation set's teacher, else <out>/teacher/latest")
    add_input_arg(group, "--init-student", "INIT_STUDENT",
                  "student run (directory, `latest` link or checkpoint) to continue from, a recovery phase: its "
                  "generator with its dead channels, widths and bits, and its discriminator",
                  "none (the student starts from the teacher: --init)")
    group = parser.add_argument_group("student")
    group.add_argument("--quant-bits", type=quant_bits, default=None,
                       help=f"weight and activation bits (default: {QUANT_BITS}, or the --init-student run's)")
    group.add_argument("--width-mult", type=positive_float, default=None,
                       help="student widths = teacher's * this (default: 1, or the --init-student run's)")
    group.add_argument("--init", choices=("auto", "teacher", "scratch"), default="auto",
                       help="student initialisation; auto = teacher when the widths match, else scratch")
    group.add_argument("--d-init", choices=("teacher", "teacher-dp", "scratch"), default=None,
                       help="discriminator start: the teacher's, the narrow one the teacher trained beside it "
                            "(teacher-dp: train_teacher.py --dp-d-channels; it also replaces an --init-student "
                            "run's), or a fresh one of the teacher's shape (default: teacher; scratch with "
                            "--d-channels; an --init-student run's own discriminator comes first)")
    group.add_argument("--d-channels", type=positive_int, nargs="+", default=None, metavar="C",
                       help="a fresh (seeded) discriminator of these widths, without a minibatch std layer, instead "
                            "of the teacher's: the one compress_student.py carries and fine_tune.py trains under "
                            "DP-SGD (e.g. 64 128 under a 128/256/512 teacher); also replaces an --init-student run's")
    group.add_argument("--norm-stats", choices=("auto", "frozen", "batch"), default="auto",
                       help="BatchNorm in training: frozen = the teacher's running statistics (a fixed affine map, "
                            "so L1 on gamma prunes instead of rescaling); batch = batch statistics; "
                            "auto = frozen when initialised from the teacher; with --init-student, its mode")
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_int, default=20)
    group.add_argument("--batch-size", type=positive_int, default=128)
    group.add_argument("--rho", type=nonnegative_float, default=0.01, help="L1 weight on the channel scales")
    group.add_argument("--beta", type=nonnegative_float, default=20.0, help="distillation weight over the GAN loss")
    group.add_argument("--distill-loss", choices=sorted(DISTILL_LOSSES), default="l1")
    group.add_argument("--penalty", choices=PENALTIES, default="uniform",
                       help="L1 weight per channel: uniform (GAN Slimming), cost: by the parameters and MACs "
                            "the channel carries, or params: by its parameters only (what the bytes count)")
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


def load_inputs(args, resuming: bool = False):
    """(distillation set, teacher checkpoint, --init-student checkpoint or None), checked against the flags;
    records the runs actually used in args (not `latest` links, which move). A resumed run has its own
    checkpoint: its --init-student is neither read nor needed again."""
    init = None if resuming else load_init_student(args)
    own_set = lineage(init)["distill"] if init is not None else None
    distill_path = input_run(args.distill_dir, DISTILL_DIR or own_set, args.out, "distill")
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
    if not resuming and getattr(args, "d_channels", None):
        fresh_discriminator(args.d_channels, teacher_checkpoint)  # widths that do not fit are refused here
    if not resuming and args.d_init == "teacher-dp" and DP_DISCRIMINATOR not in teacher_checkpoint:
        raise UserError(f"--d-init teacher-dp: teacher {args.teacher_dir} has no narrow discriminator (train it with "
                        f"train_teacher.py --dp-d-channels)")
    if init is None:
        args.quant_bits = QUANT_BITS if args.quant_bits is None else args.quant_bits
        args.width_mult = 1.0 if args.width_mult is None else args.width_mult
        student_shape(args, teacher_args["channels"])
    else:
        check_init_student(init, distill, teacher_checkpoint)
        take_init_student_shape(args, init, teacher_checkpoint)
    return distill, teacher_checkpoint, init


# ---------------------------------------------------------------- --init-student (recovery phase)

def load_init_student(args):
    """The --init-student checkpoint (or None); args.init_student becomes the run it is of (a checkpoint file, a
    snapshot for one, stays named)."""
    path = args.init_student or INIT_STUDENT
    if not path:
        return None
    init = load_checkpoint(path, "student")
    args.init_student = os.path.realpath(path) if os.path.isfile(path) else init["run_dir"]
    return init


def check_init_student(init, distill, teacher_checkpoint):
    """Refuse a student of another teacher, or whose privacy ledger is not the distillation set's: this run
    inherits the set's ledger, so what it starts from must descend from the same generator outputs."""
    teacher, name = lineage(init)["teacher"], init["run_dir"]
    if teacher is None or os.path.realpath(teacher) != os.path.realpath(teacher_checkpoint["run_dir"]):
        raise UserError(f"--init-student {name} was distilled from teacher {teacher}, not from "
                        f"{teacher_checkpoint['run_dir']}, the teacher of this run (distillation set {distill.run_dir})")
    if init["privacy"] != distill.ledger:
        raise UserError(f"--init-student {name}: its privacy ledger is not the distillation set {distill.run_dir}'s")


def take_init_student_shape(args, init, teacher_checkpoint):
    """Bits, widths and BatchNorm mode are the --init-student run's: flags that say otherwise are refused."""
    model = init["model_args"]["generator"]
    teacher_channels = teacher_checkpoint["model_args"]["generator"]["channels"]
    conflicts = []
    if args.quant_bits is not None and args.quant_bits != model["bits"]:
        conflicts.append(f"--quant-bits {args.quant_bits}")
    if args.width_mult is not None and scaled_widths(teacher_channels, args.width_mult) != list(model["channels"]):
        conflicts.append(f"--width-mult {args.width_mult:g}")
    if args.init != "auto":
        conflicts.append(f"--init {args.init}")
    if conflicts:
        raise UserError(f"--init-student {init['run_dir']} fixes the student ({model['bits']}-bit, widths "
                        f"{list(model['channels'])}): {', '.join(conflicts)} conflicts with it")
    saved = argparse.Namespace(**{"init": "auto", "width_mult": 1.0, "norm_stats": "auto", **init["args"]})
    args.quant_bits = model["bits"]
    args.width_mult = saved.width_mult if args.width_mult is None else args.width_mult
    if args.norm_stats == "auto":  # the mode it trained in: frozen statistics stay the ones it was pruned under
        args.norm_stats = "frozen" if norm_stats_frozen(saved, teacher_checkpoint) else "batch"


def student_shape(args, teacher_channels):
    """(student widths, init): the teacher's widths scaled by --width-mult; --init auto means teacher when the
    widths match."""
    channels = scaled_widths(teacher_channels, args.width_mult)
    same_widths = channels == list(teacher_channels)
    init = ("teacher" if same_widths else "scratch") if args.init == "auto" else args.init
    if init == "teacher" and not same_widths:
        raise UserError(f"--init teacher needs the teacher's widths {list(teacher_channels)}, got {channels} "
                        f"(--width-mult {args.width_mult}); use --init scratch")
    return channels, init


def scaled_widths(teacher_channels, width_mult: float) -> list:
    return [max(1, round(c * width_mult)) for c in teacher_channels]


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


# ---------------------------------------------------------------- the discriminator

def resolve_d_init(args):
    """--d-init's default: the teacher's discriminator, or with --d-channels a fresh one (`scratch`), which an
    explicit `--d-init teacher` or `teacher-dp` contradicts."""
    if args.d_channels and args.d_init in ("teacher", "teacher-dp"):
        raise UserError(f"--d-init {args.d_init} contradicts --d-channels {' '.join(map(str, args.d_channels))} (a "
                        f"fresh discriminator of those widths): give one of them")
    if args.d_init is None:
        args.d_init = "scratch" if args.d_channels else "teacher"


def fresh_discriminator(widths, teacher_checkpoint):
    """A new (seeded by the caller) discriminator of `widths` for the teacher's images, sizes and classes, never
    with a minibatch std layer even when the teacher's has one: the compact run carries it into fine_tune.py, whose
    DP-SGD cannot train a layer that mixes samples (docs/DESIGN.md, "Privacy")."""
    shape = {**teacher_checkpoint["model_args"]["discriminator"], "channels": list(widths), "minibatch_std": 0}
    try:
        return Discriminator(**shape)
    except ValueError as exc:
        raise UserError(f"--d-channels: {exc}") from exc


def build_models(args, checkpoint, teacher_checkpoint, init=None):
    """Student and discriminator: fresh (seeded) or from the teacher, or the --init-student run's (`init`: its
    generator as it ended, `alive` masks included, and its discriminator where it has one), or the ones of the run
    being resumed. --d-channels: a fresh discriminator of those widths in place of the teacher's or init's;
    --d-init teacher-dp: the teacher's narrow one (DP_DISCRIMINATOR), in place of either too."""
    if checkpoint is not None:
        return build_generator(checkpoint), build_discriminator(checkpoint)
    student = build_student(args, build_generator(teacher_checkpoint)) if init is None else build_generator(init)
    if getattr(args, "d_channels", None):
        return student, fresh_discriminator(args.d_channels, teacher_checkpoint)
    if args.d_init == "teacher-dp":
        return student, build_discriminator(teacher_checkpoint, DP_DISCRIMINATOR)
    if init is not None and "discriminator" in init:
        return student, build_discriminator(init)
    if args.d_init == "scratch":
        return student, Discriminator(**teacher_checkpoint["model_args"]["discriminator"])
    return student, build_discriminator(teacher_checkpoint)


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


def make_step(args, run: Run, distill, teacher_checkpoint, init, device, precision) -> SlimmingStep:
    G, D = (m.to(device) for m in build_models(args, run.checkpoint, teacher_checkpoint, init))
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
    if not args.resume:  # a resumed run keeps its own (saved) discriminator settings
        resolve_d_init(args)
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
    distill, teacher_checkpoint, init = inputs or load_inputs(args, resuming=checkpoint is not None)
    penalty = getattr(args, "penalty", "uniform")
    desc = f"b{args.quant_bits}-rho{args.rho:g}{'' if penalty == 'uniform' else '-' + penalty}"
    desc += f"-d{'-'.join(map(str, args.d_channels))}" if getattr(args, "d_channels", None) else ""
    run = Run.open(args, STAGE, desc + ("-recovery" if getattr(args, "init_student", None) else ""), checkpoint)
    set_seed(args.seed)
    step = make_step(args, run, distill, teacher_checkpoint, init, device, precision)
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
