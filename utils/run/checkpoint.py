"""Run directories, self-describing checkpoints and append-only metrics (docs/DESIGN.md, "Checkpoints").

A run lives in `<out>/<stage>/<NNNNN>-<desc>/`; `<out>/<stage>/latest` is a symlink to the newest run that has a
complete checkpoint. A checkpoint is one dict: the fields every stage writes (`checkpoint_fields`: stage, step,
args, parent, model_args and unwrapped state dicts, privacy ledger, data, versions) plus the stage's own, written
atomically and read back with `torch.load(weights_only=True)` so that it can never run code. Paths to other runs
are stored relative to the pipeline root `<out>` (so a pipeline directory can be moved or copied whole) and come
back absolute from `load_checkpoint`; `lineage` follows them back to the teacher.

torch is imported inside the functions that use it: the run directories and `latest` serve generate.py's --onnx path
too, in a process without torch.
"""
import json
import os
import pickle
import re
import time
import zipfile

from utils.run.cli import UserError
from utils.run.files import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
PROJECT_VERSION = "0.1.0"
WRAPPER_PREFIXES = ("_module.", "module.", "_orig_mod.")
PATH_FIELDS = ("parent", "teacher", "runs")  # checkpoint entries naming other runs (a path or a list of paths)
# input paths in a checkpoint's args: stored relative to the pipeline root `<out>` when inside it
PATH_ARGS = ("out", "teacher_dir", "distill_dir", "student_dir", "generator_dir", "teacher", "runs", "init_student")
LINEAGE_STAGES = ("teacher", "distill", "student")
# A teacher's narrow discriminator trained beside its own (train_teacher.py --dp-d-channels), the one
# `train_student.py --d-init teacher-dp` starts from: its checkpoint entry (and model_args key)
DP_DISCRIMINATOR = "dp_discriminator"


def versions() -> dict:
    import opacus
    import torch
    return {"torch": str(torch.__version__), "opacus": str(opacus.__version__), "project": PROJECT_VERSION}


def unwrapped_state_dict(module) -> dict:
    """A torch.nn.Module's state dict without the prefixes that Opacus, DataParallel or torch.compile add."""
    import torch
    state = {}
    for key, value in module.state_dict().items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        state[key] = value.detach().clone(memory_format=torch.contiguous_format)  # channels-last networks too
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


def input_run(flag_value, editable_default, out: str, stage: str) -> str:
    """The run a script reads: its command-line flag, else the script's editable constant (e.g. STUDENT_DIR),
    else `<out>/<stage>/latest`."""
    return flag_value or editable_default or latest_run(out, stage)


def resolve_run_dir(path: str) -> str:
    """A run directory from a run directory, a `latest` link, a stage directory or a checkpoint file."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    if not os.path.exists(os.path.join(path, CHECKPOINT_NAME)) and os.path.exists(os.path.join(path, "latest")):
        path = os.path.join(path, "latest")
    return os.path.realpath(path)


def pipeline_root(run_dir: str) -> str:
    """`<out>` of a run directory `<out>/<stage>/<run>`."""
    return os.path.dirname(os.path.dirname(os.path.realpath(run_dir)))


def relative_to_root(path, root: str):
    """`path` relative to the pipeline root when it lies inside it, else absolute (None stays None)."""
    if not path:
        return path
    real, root = os.path.realpath(path), os.path.realpath(root)
    if real == root or real.startswith(root + os.sep):
        return os.path.relpath(real, root)
    return real


def absolute_from_root(path, root: str):
    """Inverse of `relative_to_root`."""
    if not path or os.path.isabs(path):
        return path
    return os.path.realpath(os.path.join(root, path))


def _convert_paths(checkpoint: dict, root: str, convert) -> dict:
    """A shallow copy of `checkpoint` with its PATH_FIELDS and PATH_ARGS converted by `convert(path, root)`."""
    def each(value):
        if isinstance(value, (list, tuple)):
            return [each(item) for item in value]
        return convert(value, root) if isinstance(value, str) else value

    converted = {key: each(value) if key in PATH_FIELDS else value for key, value in checkpoint.items()}
    if isinstance(converted.get("args"), dict):
        converted["args"] = {key: each(value) if key in PATH_ARGS else value
                             for key, value in converted["args"].items()}
    return converted


def stored_paths(checkpoint: dict, root: str) -> dict:
    """A shallow copy of `checkpoint` with its paths to other runs as a checkpoint file stores them: resolved (a
    `latest` link to the run it points at now) and relative to the pipeline root `root`."""
    return _convert_paths(checkpoint, root, relative_to_root)


# ---------------------------------------------------------------- checkpoints

def checkpoint_fields(stage: str, args, *, step: int = 0, parent=None, models: dict = None, ledger=None,
                      data=None) -> dict:
    """The fields every stage's checkpoint has (each stage's extra fields: docs/DESIGN.md,
    "Checkpoints").
    `models` maps a name ("generator", "discriminator") to a network that has `model_args()`."""
    models = models or {}
    fields = {"stage": stage, "step": int(step), "args": dict(vars(args)), "parent": parent,
              "model_args": {name: model.model_args() for name, model in models.items()},
              "privacy": ledger, "data": data, "versions": versions()}
    fields.update({name: unwrapped_state_dict(model) for name, model in models.items()})
    return fields


def contiguous_optimizer_state(optimizer) -> dict:
    """The optimiser's state dict with its tensors in the default memory layout (a channels-last network's Adam
    moments are channels-last): checkpoints look the same whatever layout trained them."""
    import torch
    state = optimizer.state_dict()
    state["state"] = {key: {name: value.contiguous() if torch.is_tensor(value) else value
                            for name, value in entry.items()} for key, entry in state["state"].items()}
    return state


def data_fields(split) -> dict:
    """The `data` entry of a checkpoint whose stage trained on `split` (a `utils.data.datasets.ImageSplit`)."""
    fields = {"dataset": split.dataset, "split": split.split, "size": len(split), "fingerprint": split.fingerprint,
              "source": split.source}
    return {**fields, "subset": split.subset} if split.subset else fields


def save_checkpoint(run_dir: str, checkpoint: dict, name: str = CHECKPOINT_NAME) -> str:
    """Write atomically (temp file, fsync, rename), paths to other runs stored relative to the pipeline root."""
    import torch
    path = os.path.join(run_dir, name)
    stored = stored_paths(checkpoint, pipeline_root(run_dir))
    stored.pop("run_dir", None)  # where it was loaded from: never part of the file
    with atomic_write(path, "wb") as handle:
        torch.save(stored, handle)
    return path


def _unpickler_reason(exc) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "Unsupported global" in line]
    return lines[0].split(" was not")[0] if lines else str(exc).splitlines()[0]


def _read(file: str, **load_args) -> dict:
    """torch.load(weights_only=True) with every failure as a UserError."""
    import torch
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; anything else is damaged or foreign
        raise UserError(f"{file}: corrupt or truncated checkpoint (not a torch.save archive)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True, **load_args)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{file}: refused, it holds objects other than tensors and plain data "
                        f"(a checkpoint must never run code): {_unpickler_reason(exc)}") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UserError(f"{file}: corrupt or truncated checkpoint ({str(exc).splitlines()[0]})") from exc


def load_checkpoint(path: str, stage=None, **load_args) -> dict:
    """Load a checkpoint from a file or run directory; `stage` (a name or tuple) is the stage(s) accepted.
    The result has `run_dir` (where it was found) and its paths to other runs made absolute."""
    run_dir = resolve_run_dir(path)
    file = path if os.path.isfile(path) else os.path.join(run_dir, CHECKPOINT_NAME)
    if not os.path.isfile(file):
        raise UserError(f"{path}: no {CHECKPOINT_NAME} there (is it a run directory of this pipeline?)")
    checkpoint = _read(file, **load_args)
    if not isinstance(checkpoint, dict) or "stage" not in checkpoint:
        raise UserError(f"{file}: not a checkpoint of this pipeline (no 'stage' entry)")
    accepted = (stage,) if isinstance(stage, str) else stage
    if accepted and checkpoint["stage"] not in accepted:
        raise UserError(f"{file}: a '{checkpoint['stage']}' checkpoint, expected {' or '.join(accepted)}")
    checkpoint = _convert_paths(checkpoint, pipeline_root(run_dir), absolute_from_root)
    checkpoint["run_dir"] = run_dir
    return checkpoint


def _peek(run_dir):
    """A run's checkpoint read lazily (memory-mapped: a parent may be large), or None where it cannot be read."""
    if not run_dir or not os.path.isfile(os.path.join(run_dir, CHECKPOINT_NAME)):
        return None
    try:
        return load_checkpoint(run_dir, mmap=True)
    except UserError:
        return None


def lineage(checkpoint: dict) -> dict:
    """{"teacher", "distill", "student"}: the run directory of each stage this checkpoint descends from (itself
    included), None where unknown. Follows `parent` links; a run's own `teacher` entry (an explicit
    --teacher-dir) wins over the distillation set's parent. Only runs that exist on disk are returned."""
    runs = dict.fromkeys(LINEAGE_STAGES)
    current, seen = checkpoint, set()
    while current is not None and current.get("run_dir") not in seen:
        seen.add(current.get("run_dir"))
        if current.get("stage") in runs and runs[current["stage"]] is None:
            runs[current["stage"]] = current.get("run_dir")
        teacher = current.get("teacher")
        if runs["teacher"] is None and teacher and os.path.isfile(os.path.join(teacher, CHECKPOINT_NAME)):
            runs["teacher"] = teacher
        current = _peek(current.get("parent"))
    return runs


def build_generator(checkpoint: dict):
    """Rebuild a generator from any checkpoint that holds one: no flags needed."""
    from models import Generator
    generator = Generator(**checkpoint["model_args"]["generator"])
    generator.load_state_dict(checkpoint["generator"])
    return generator


def build_discriminator(checkpoint: dict, key: str = "discriminator"):
    """Rebuild the discriminator a checkpoint holds under `key` (a teacher's narrow one: DP_DISCRIMINATOR)."""
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
        with atomic_write(self.path) as handle:
            handle.writelines(kept)


def read_metrics(run_dir: str) -> list:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]
