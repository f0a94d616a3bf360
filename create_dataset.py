"""Stage 2: sample the teacher into a distillation set of (z, label, teacher image) triples.

Labels are balanced over the classes and shuffled, z ~ N(0, I); both come from --seed, so the same seed and
teacher give identical files. The teacher runs in eval mode. Sampling a generator is post-processing, so the
set's privacy ledger is the teacher's, unchanged. The files are written into a hidden temporary directory that
is renamed to `<out>/distill/<NNNNN>-<desc>/` only once complete; `latest` then moves to it.

One process, not torchrun: sampling runs on --device (auto: a GPU if there is one, else MPS, else the CPU's
threads), which a 200k-sample set keeps busy for minutes, not hours.
"""
import os
import shutil

import numpy as np
import torch

from utils.data.distill import ARRAYS, IMAGE_ENCODINGS, META_NAME, array_specs, decode_images, encode_images, nbytes
from utils.evaluation.plots import save_samples
from utils.privacy.ledger import inherit, warn_if_not_private
from utils.run.checkpoint import build_generator, checkpoint_fields, input_run, load_checkpoint
from utils.run.cli import UserError, add_common_args, add_input_arg, make_parser, positive_int, progress_bar, run_script
from utils.run.distributed import single_process_device
from utils.run.files import write_json
from utils.run.lifecycle import Run, maybe_dry_run
from utils.run.precision import add_precision_arg, announce, resolve_precision

STAGE = "distill"
# The teacher this stage samples, editable here: None means <out>/teacher/latest; --teacher-dir overrides it.
TEACHER_DIR = None
DISK_MARGIN = 64 * 2**20  # bytes kept free beyond the set itself (meta, grid, checkpoint, the file system)


def parse_args(argv=None):
    parser = make_parser(__doc__, "python create_dataset.py --teacher-dir checkpoints/teacher/latest "
                                  "--num-samples 200000")
    group = parser.add_argument_group("distillation set")
    add_input_arg(group, "--teacher-dir", "TEACHER_DIR", "teacher run directory", "<out>/teacher/latest")
    group.add_argument("--num-samples", type=positive_int, default=200000, help="number of (z, label, image) triples")
    group.add_argument("--batch-size", type=positive_int, default=1000, help="teacher batch size while sampling")
    group.add_argument("--image-dtype", choices=sorted(IMAGE_ENCODINGS), default="uint8",
                       help="storage of teacher images; uint8 is round((x+1)*127.5), error <= 1/255")
    add_precision_arg(group)
    add_common_args(parser)
    return parser.parse_args(argv)


def draw_inputs(count: int, nz: int, num_classes: int, seed: int):
    """z ~ N(0, I) and balanced, shuffled labels, all from `seed` (independent of the sampling batch size)."""
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(count, nz, generator=rng)
    labels = (torch.arange(count) % num_classes)[torch.randperm(count, generator=rng)]
    return z, labels


def check_disk_space(directory: str, needed: int):
    free = shutil.disk_usage(directory).free
    if free < needed + DISK_MARGIN:
        raise UserError(f"not enough disk space in {directory}: the set needs {needed / 2**20:.0f} MiB (+ "
                        f"{DISK_MARGIN / 2**20:.0f} MiB margin), {free / 2**20:.0f} MiB free; use fewer "
                        f"--num-samples or another --out")


@torch.no_grad()
def write_arrays(directory: str, teacher, z, labels, specs: dict, batch_size: int, device):
    """Fill `<name>.npy` memory maps batch by batch, so memory use does not grow with the set. `teacher` is the
    network or its precision's wrapper (utils/run/precision.py)."""
    arrays = {name: np.lib.format.open_memmap(os.path.join(directory, f"{name}.npy"), mode="w+",
                                              dtype=specs[name]["dtype"], shape=tuple(specs[name]["shape"]))
              for name in ARRAYS}
    arrays["z"][:] = z.numpy()
    arrays["labels"][:] = labels.numpy()
    for start in progress_bar(range(0, len(z), batch_size), desc="distill", unit="batch"):
        stop = start + batch_size
        images = teacher(z[start:stop].to(device), labels[start:stop].to(device)).cpu()
        arrays["images"][start:stop] = encode_images(images, specs["images"]["dtype"])
    for array in arrays.values():
        array.flush()


def save_grid(directory: str, num_classes: int, per_class: int = 10):
    """samples.png from the stored files: one row per class."""
    labels = np.load(os.path.join(directory, "labels.npy"), mmap_mode="r")
    images = np.load(os.path.join(directory, "images.npy"), mmap_mode="r")
    per_class = min(per_class, min(int((labels == c).sum()) for c in range(num_classes)))
    picks = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)])
    save_samples(decode_images(images[picks]), os.path.join(directory, "samples.png"), nrow=per_class)


def sample_count(args) -> int:
    return args.num_samples if args.max_steps is None else min(args.num_samples, args.max_steps * args.batch_size)


@torch.no_grad()
def set_specs(args, teacher, device) -> dict:
    """The arrays' shapes and dtypes; refuses (before anything is written) a set smaller than the classes or
    larger than the free disk."""
    count = sample_count(args)
    if count < teacher.num_classes:
        raise UserError(f"--num-samples {count} is fewer than the {teacher.num_classes} classes")
    image_shape = list(teacher(*teacher.sample_inputs(1, device=device)).shape[1:])
    specs = array_specs(count, teacher.nz, image_shape, args.image_dtype)
    check_disk_space(nearest_existing(os.path.join(args.out, STAGE)), nbytes(specs))
    return specs


def nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def write_set(directory: str, args, teacher_checkpoint, teacher, specs: dict, device, precision):
    """The arrays, meta.json and samples.png of the set, into `directory`; the teacher runs in `precision`."""
    count, image_shape = specs["labels"]["shape"][0], specs["images"]["shape"][1:]
    z, labels = draw_inputs(count, teacher.nz, teacher.num_classes, args.seed)
    write_arrays(directory, precision.wrap(teacher), z, labels, specs, args.batch_size, device)
    write_json(os.path.join(directory, META_NAME), {
        "teacher": teacher_checkpoint["run_dir"], "seed": args.seed, "count": count, "nz": teacher.nz,
        "num_classes": teacher.num_classes, "image_shape": image_shape, "image_dtype": args.image_dtype,
        "image_encoding": IMAGE_ENCODINGS[args.image_dtype], "labels": "balanced over classes, shuffled",
        "files": specs, "precision": precision.describe()})
    save_grid(directory, teacher.num_classes)


def main(args):
    args.teacher_dir = input_run(args.teacher_dir, TEACHER_DIR, args.out, "teacher")
    if maybe_dry_run(args):
        return None
    device = single_process_device(args.device, "create_dataset.py")
    precision = resolve_precision(args.precision, device).for_use("sampling")
    teacher_checkpoint = load_checkpoint(args.teacher_dir, "teacher")
    args.teacher_dir = teacher_checkpoint["run_dir"]  # the run actually used, not a `latest` link that moves
    warn_if_not_private(teacher_checkpoint["privacy"])
    teacher = build_generator(teacher_checkpoint).to(device).eval()
    specs = set_specs(args, teacher, device)
    # written into a hidden directory, numbered only once complete; the checkpoint comes last, so `latest`
    # moves only to a set whose every file is in place
    run = Run.open(args, STAGE, f"n{sample_count(args)}", staged=True)
    announce(precision, STAGE)
    try:
        write_set(run.run_dir, args, teacher_checkpoint, teacher, specs, device, precision)
        run.publish()
    except BaseException:
        run.discard()
        raise
    run.save(checkpoint_fields(STAGE, args, step=sample_count(args), parent=teacher_checkpoint["run_dir"],
                               ledger=inherit(teacher_checkpoint["privacy"])))
    return run.finish(f"{sample_count(args)} samples")


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
