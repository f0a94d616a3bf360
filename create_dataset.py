"""Stage 2: sample the teacher into a distillation set of (z, label, teacher image) triples.

Labels are balanced over the classes and shuffled, z ~ N(0, I); both come from --seed, so the same seed and
teacher give identical files. The teacher runs in eval mode. Sampling a generator is post-processing, so the
set's privacy ledger is the teacher's, unchanged. The files are written into a hidden temporary directory that
is renamed to `<out>/distill/<NNNNN>-<desc>/` only once complete; `latest` then moves to it.
"""
import os
import shutil
import tempfile

import numpy as np
import torch
from tqdm import tqdm

from utils.checkpoint import build_generator, latest_run, load_checkpoint, new_run_dir, write_json
from utils.cli import add_common_args, make_parser, positive_int, resolve_device, run_script, UserError
from utils.distill import ARRAYS, IMAGE_ENCODINGS, META_NAME, array_specs, decode_images, encode_images, nbytes
from utils.plots import save_samples
from utils.privacy import inherit, warn_if_not_private
from utils.training import maybe_dry_run, save_run_checkpoint

STAGE = "distill"
DISK_MARGIN = 64 * 2**20  # bytes kept free beyond the set itself (meta, grid, checkpoint, the file system)


def parse_args(argv=None):
    parser = make_parser(__doc__, "python create_dataset.py --teacher-dir checkpoints/teacher/latest "
                                  "--num-samples 200000")
    group = parser.add_argument_group("distillation set")
    group.add_argument("--teacher-dir", default=None, help="teacher run directory (default: <out>/teacher/latest)")
    group.add_argument("--num-samples", type=positive_int, default=200000, help="number of (z, label, image) triples")
    group.add_argument("--batch-size", type=positive_int, default=1000, help="teacher batch size while sampling")
    group.add_argument("--image-dtype", choices=sorted(IMAGE_ENCODINGS), default="uint8",
                       help="storage of teacher images; uint8 is round((x+1)*127.5), error <= 1/255")
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
    """Fill `<name>.npy` memory maps batch by batch, so memory use does not grow with the set."""
    arrays = {name: np.lib.format.open_memmap(os.path.join(directory, f"{name}.npy"), mode="w+",
                                              dtype=specs[name]["dtype"], shape=tuple(specs[name]["shape"]))
              for name in ARRAYS}
    arrays["z"][:] = z.numpy()
    arrays["labels"][:] = labels.numpy()
    for start in tqdm(range(0, len(z), batch_size), desc="distill", unit="batch", dynamic_ncols=True):
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


def build_set(args, teacher_checkpoint, device) -> str:
    """Write the complete set into a temporary directory, then rename it into place; returns the run dir."""
    teacher = build_generator(teacher_checkpoint).to(device).eval()
    count = args.num_samples if args.max_steps is None else min(args.num_samples, args.max_steps * args.batch_size)
    if count < teacher.num_classes:
        raise UserError(f"--num-samples {count} is fewer than the {teacher.num_classes} classes")
    with torch.no_grad():
        image_shape = list(teacher(*teacher.sample_inputs(1, device=device)).shape[1:])
    specs = array_specs(count, teacher.nz, image_shape, args.image_dtype)
    stage_dir = os.path.join(args.out, STAGE)
    os.makedirs(stage_dir, exist_ok=True)
    check_disk_space(stage_dir, nbytes(specs))
    tmp = tempfile.mkdtemp(prefix=".partial-", dir=stage_dir)  # never numbered, so never taken for a run
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a run directory is not
    try:
        z, labels = draw_inputs(count, teacher.nz, teacher.num_classes, args.seed)
        write_arrays(tmp, teacher, z, labels, specs, args.batch_size, device)
        write_json(os.path.join(tmp, META_NAME), {
            "teacher": teacher_checkpoint["run_dir"], "seed": args.seed, "count": count, "nz": teacher.nz,
            "num_classes": teacher.num_classes, "image_shape": image_shape, "image_dtype": args.image_dtype,
            "image_encoding": IMAGE_ENCODINGS[args.image_dtype], "labels": "balanced over classes, shuffled",
            "files": specs})
        write_json(os.path.join(tmp, "args.json"), vars(args))
        save_grid(tmp, teacher.num_classes)
        run_dir = new_run_dir(args.out, STAGE, args.desc or f"n{count}")
        os.replace(tmp, run_dir)  # onto the freshly reserved, empty run directory: atomic on POSIX
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # the checkpoint comes last: `latest` moves only to a set whose every file is in place
    save_run_checkpoint(run_dir, {"stage": STAGE, "step": count, "args": vars(args), "model_args": {},
                                  "parent": teacher_checkpoint["run_dir"],
                                  "privacy": inherit(teacher_checkpoint["privacy"])})
    tqdm.write(f"distill: {count} samples, run directory {run_dir}")
    return run_dir


def main(args):
    args.teacher_dir = args.teacher_dir or latest_run(args.out, "teacher")
    if maybe_dry_run(args):
        return None
    device = resolve_device(args.device)
    teacher_checkpoint = load_checkpoint(args.teacher_dir, "teacher")
    args.teacher_dir = teacher_checkpoint["run_dir"]  # the run actually used, not a `latest` link that moves
    warn_if_not_private(teacher_checkpoint["privacy"])
    return build_set(args, teacher_checkpoint, device)


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
