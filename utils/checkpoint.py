"""Run directories, self-describing checkpoints and append-only metrics (DESIGN section 3).

A run lives in `<out>/<stage>/<NNNNN>-<desc>/`; `<out>/<stage>/latest` is a symlink to the newest run that has a
complete checkpoint. A checkpoint is one dict (stage, model_args, unwrapped state dicts, optimiser state, step,
args, parent, privacy ledger, versions), written to a temporary file and renamed into place, and read back with
`torch.load(weights_only=True)` so that it can never run code.
"""
import json
import os
import pickle
import re
import time
import zipfile

import torch

from utils.cli import UserError

STAGES = ("teacher", "distill", "student", "compact", "private", "eval")
CHECKPOINT_NAME = "checkpoint.pt"
PROJECT_VERSION = "0.1.0"
WRAPPER_PREFIXES = ("_module.", "module.", "_orig_mod.")


def versions() -> dict:
    import opacus
    return {"torch": str(torch.__version__), "opacus": str(opacus.__version__), "project": PROJECT_VERSION}


def unwrapped_state_dict(module: torch.nn.Module) -> dict:
    """State dict without the prefixes that Opacus, DataParallel or torch.compile add."""
    state = {}
    for key, value in module.state_dict().items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        state[key] = value.detach().clone()
    return state


# ---------------------------------------------------------------- run directories

def new_run_dir(out: str, stage: str, desc: str) -> str:
    """Create `<out>/<stage>/<NNNNN>-<desc>/`, numbered one past the highest existing run."""
    stage_dir = os.path.join(out, stage)
    os.makedirs(stage_dir, exist_ok=True)
    numbers = [int(m.group(1)) for name in os.listdir(stage_dir) if (m := re.match(r"(\d{5})-", name))]
    number = max(numbers, default=-1) + 1
    while True:
        run_dir = os.path.join(stage_dir, f"{number:05d}-{desc}")
        try:
            os.makedirs(run_dir)
            return run_dir
        except FileExistsError:  # another process took this number
            number += 1


def mark_latest(run_dir: str):
    """Point `<stage>/latest` at `run_dir` (atomically: a kill never leaves a dangling pointer)."""
    stage_dir = os.path.dirname(os.path.abspath(run_dir))
    tmp = os.path.join(stage_dir, f".latest.{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.basename(os.path.abspath(run_dir)), tmp)
    os.replace(tmp, os.path.join(stage_dir, "latest"))


def latest_run(out: str, stage: str) -> str:
    return os.path.join(out, stage, "latest")


def resolve_run_dir(path: str) -> str:
    """A run directory from a run directory, a `latest` link, a stage directory or a checkpoint file."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    if not os.path.exists(os.path.join(path, CHECKPOINT_NAME)) and os.path.exists(os.path.join(path, "latest")):
        path = os.path.join(path, "latest")
    return os.path.realpath(path)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir: str, checkpoint: dict, name: str = CHECKPOINT_NAME) -> str:
    """Write atomically: temp file, fsync, rename. A kill mid-write leaves the previous checkpoint intact."""
    path = os.path.join(run_dir, name)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as handle:
        torch.save(checkpoint, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def _unpickler_reason(exc) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
    return lines[0].split(" was not")[0] if lines else str(exc).splitlines()[0]


def load_checkpoint(path: str, stage=None, map_location="cpu") -> dict:
    """Load a checkpoint from a file or run directory; `stage` (a name or tuple) is the stage(s) accepted."""
    run_dir = resolve_run_dir(path)
    file = path if os.path.isfile(path) else os.path.join(run_dir, CHECKPOINT_NAME)
    if not os.path.isfile(file):
        raise UserError(f"{path}: no {CHECKPOINT_NAME} there (is it a run directory of this pipeline?)")
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; anything else is damaged or foreign
        raise UserError(f"{file}: corrupt or truncated checkpoint (not a torch.save archive)")
    try:
        checkpoint = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{file}: refused, it holds objects other than tensors and plain data "
                        f"(a checkpoint must never run code): {_unpickler_reason(exc)}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"{file}: corrupt or truncated checkpoint ({str(exc).splitlines()[0]})") from exc
    if not isinstance(checkpoint, dict) or "stage" not in checkpoint:
        raise UserError(f"{file}: not a checkpoint of this pipeline (no 'stage' entry)")
    accepted = (stage,) if isinstance(stage, str) else stage
    if accepted and checkpoint["stage"] not in accepted:
        raise UserError(f"{file}: a '{checkpoint['stage']}' checkpoint, expected {' or '.join(accepted)}")
    checkpoint["run_dir"] = run_dir
    return checkpoint


def build_generator(checkpoint: dict, key: str = "generator"):
    """Rebuild a generator from any checkpoint that holds one: no flags needed."""
    from models import Generator
    generator = Generator(**checkpoint["model_args"][key])
    generator.load_state_dict(checkpoint[key])
    return generator


def build_discriminator(checkpoint: dict, key: str = "discriminator"):
    from models import Discriminator
    discriminator = Discriminator(**checkpoint["model_args"][key])
    discriminator.load_state_dict(checkpoint[key])
    return discriminator


# ---------------------------------------------------------------- metrics

class MetricsLog:
    """`metrics.jsonl`: one JSON object per line, appended and flushed, never rewritten."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.start = time.time()

    def append(self, **record):
        record.setdefault("time", round(time.time() - self.start, 3))
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int):
        """On resume: drop records past the checkpoint's step, so the log matches an uninterrupted run."""
        if not os.path.exists(self.path):
            return
        kept = [line for line in open(self.path) if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path + ".tmp", "w") as handle:
            handle.writelines(kept)
        os.replace(self.path + ".tmp", self.path)


def read_metrics(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def write_json(path: str, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
    os.replace(tmp, path)
