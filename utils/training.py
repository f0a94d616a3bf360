"""The life cycle of a training run shared by the stages: open or resume a run directory, save checkpoints
atomically and move `latest`, restore the generators that make a resumed run identical to an uninterrupted one."""
import argparse
import os

import torch

from utils.checkpoint import (latest_run, load_checkpoint, mark_latest, new_run_dir, save_checkpoint, versions,
                              write_json, MetricsLog)
from utils.cli import print_config

# flags taken from the command line on --resume; everything else comes from the run's saved args
RESUME_OVERRIDES = ("resume", "max_steps", "device", "dry_run")


def resume_args(args: argparse.Namespace, stage: str):
    """(args, checkpoint): with --resume, the run's saved args (but RESUME_OVERRIDES) and its last checkpoint;
    otherwise (args, None). Touches nothing on disk, so bad input can be refused before a run directory exists."""
    if not args.resume:
        return args, None
    path = latest_run(args.out, stage) if args.resume == "latest" else args.resume
    checkpoint = load_checkpoint(path, stage)
    saved = dict(checkpoint["args"])
    # the command line wins for RESUME_OVERRIDES, except --max-steps left unset: the run keeps its own stop
    saved.update({key: getattr(args, key) for key in RESUME_OVERRIDES
                  if hasattr(args, key) and not (key == "max_steps" and args.max_steps is None)})
    return argparse.Namespace(**saved), checkpoint


def start_run(args: argparse.Namespace, stage: str, desc: str, checkpoint=None):
    """(run_dir, metrics log): a new numbered run directory with args.json, or the resumed run's directory with
    its metrics cut back to the checkpoint's step."""
    if checkpoint is not None:
        metrics = MetricsLog(checkpoint["run_dir"])
        metrics.truncate_after(checkpoint["step"])
        return checkpoint["run_dir"], metrics
    run_dir = new_run_dir(args.out, stage, args.desc or desc)
    write_json(os.path.join(run_dir, "args.json"), vars(args))
    return run_dir, MetricsLog(run_dir)


def open_run(args: argparse.Namespace, stage: str, desc: str):
    """(args, run_dir, checkpoint or None, metrics log): `resume_args` then `start_run`."""
    args, checkpoint = resume_args(args, stage)
    run_dir, metrics = start_run(args, stage, desc, checkpoint)
    return args, run_dir, checkpoint, metrics


def maybe_dry_run(args) -> bool:
    if args.dry_run:
        print_config(args)
    return args.dry_run


def save_run_checkpoint(run_dir: str, checkpoint: dict):
    """Save atomically, then point `latest` at this run (only ever at a complete checkpoint)."""
    checkpoint.setdefault("versions", versions())
    save_checkpoint(run_dir, checkpoint)
    mark_latest(run_dir)


def rng_from(checkpoint, key: str, seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`, or restored from a checkpoint's saved state."""
    rng = torch.Generator().manual_seed(seed)
    if checkpoint is not None and key in checkpoint.get("rng", {}):
        rng.set_state(checkpoint["rng"][key])
    return rng


def batches_from(batches, step: int, total: int):
    """(epoch, batch) from optimiser step `step` up to `total`: a resumed run sees the same batches in the same
    order as an uninterrupted one (the epoch order comes from the epoch number, not from saved state)."""
    while step < total:
        epoch, start = divmod(step, len(batches))
        for batch in batches.epoch(epoch, start):
            yield epoch, batch
            step += 1
            if step >= total:
                return


def checkpoint_due(step: int, total: int, steps_per_epoch: int, every: int) -> bool:
    """Checkpoint every `every` steps, at each epoch end and at the last step."""
    return step % every == 0 or step % steps_per_epoch == 0 or step == total
