"""--once: what a stage does about its earlier runs under --out (docs/DESIGN.md, "Running a stage once").

Every run that ends writes `finished.json`: its settings (`run_settings`: the arguments without NOT_SETTINGS, paths
to other runs resolved and relative to the pipeline root) and the runs it read (`run_reads`). With --once a stage
first looks at its runs (`previous_runs`), newest first, keeping those of the same settings that still read what
this invocation reads (`still_read`):

    finished                                  -> nothing to do (`NothingToDo`); `latest` points at it again
    interrupted, with a checkpoint            -> resumed (training stages: `lifecycle.resume_args`)
    interrupted, with its progress            -> continued in its directory (evaluate.py: `lifecycle.Run.reopen`)
    unfinished --once run, nothing to resume  -> removed, and the new run takes its place (`clear_the_way`)

Runs with other settings or inputs are left as they are. A run's settings are its command line, not the code or
the dataset's content: after changing either, use another --out.
"""
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import NamedTuple

from utils.run.checkpoint import (CHECKPOINT_NAME, PATH_ARGS, PATH_FIELDS, absolute_from_root, load_checkpoint,
                                  mark_latest, stored_paths)
from utils.run.cli import NothingToDo, UserError
from utils.run.distributed import is_writer
from utils.run.files import read_json

FINISHED_NAME = "finished.json"
# what an unfinished run of a stage without a training checkpoint has done so far (evaluate.py: the rows of the
# generators it has measured): --once continues such a run instead of starting it again
PROGRESS_NAME = "progress.json"
# what a run's settings leave out: where and how this process runs, and the flags that only steer it
NOT_SETTINGS = ("resume", "once", "pipeline_stage", "dry_run", "device", "out")


def run_settings(args: dict, root: str) -> dict:
    """What makes a run what it is, for --once: its arguments without NOT_SETTINGS, paths to other runs resolved and
    relative to the pipeline root `root` (`stored_paths`), as JSON values."""
    kept = {key: value for key, value in args.items() if key not in NOT_SETTINGS}
    kept = stored_paths({"args": kept}, root)["args"]
    return json.loads(json.dumps(kept, sort_keys=True, default=str))


def _paths(values) -> list:
    """The strings among `values`, lists flattened."""
    found = []
    for value in values:
        if isinstance(value, (list, tuple)):
            found += _paths(value)
        elif isinstance(value, str):
            found.append(value)
    return found


def run_reads(checkpoint: dict, root: str) -> list:
    """The runs a checkpoint names as its inputs (PATH_FIELDS: parent, teacher, evaluated runs), relative to `root`."""
    stored = stored_paths({key: checkpoint.get(key) for key in PATH_FIELDS}, root)
    return sorted(_paths(stored.values()))


def still_read(reads: list, settings: dict, root: str) -> bool:
    """Whether this invocation reads the runs in `reads` too: each is named by one of its input flags (in
    `settings`), or is still the `latest` of its stage (what a default input reads). A stage run again upstream
    moves its `latest`, so the stages after it run again."""
    named = _paths(settings.get(key) for key in PATH_ARGS)
    for read in reads:
        if any(name == read or name.startswith(read + os.sep) for name in named):
            continue
        path = absolute_from_root(read, root)
        if os.path.realpath(os.path.join(os.path.dirname(path), "latest")) != os.path.realpath(path):
            return False
    return True


@dataclass
class Previous:
    """A stage's earlier runs with the settings of this invocation, newest first (`previous_runs`)."""
    finished: str = None  # one that finished: nothing to do
    interrupted: str = None  # one with a checkpoint or its progress but not finished: continue it
    stale: list = field(default_factory=list)  # unfinished --once runs with nothing to resume: remove, start again


class RunRecord(NamedTuple):
    """A run directory as --once compares it."""
    settings: dict
    reads: list
    finished: bool
    resumable: bool  # it has a checkpoint, or its progress (PROGRESS_NAME)
    once: bool  # started with --once


def run_record(run_dir: str, root: str):
    """The RunRecord of a run directory: a finished run's from `finished.json`, an unfinished one's from its
    checkpoint, else from `args.json`; None where none of them can be read."""
    has_checkpoint = os.path.isfile(os.path.join(run_dir, CHECKPOINT_NAME))
    finished = read_json(os.path.join(run_dir, FINISHED_NAME))
    if has_checkpoint and isinstance(finished, dict) and "settings" in finished:
        return RunRecord(finished["settings"], finished.get("reads", []), True, True, True)
    if has_checkpoint:
        try:
            checkpoint = load_checkpoint(run_dir, mmap=True)
        except UserError:
            return None
        args, reads = checkpoint.get("args") or {}, run_reads(checkpoint, root)
    else:
        args, reads = read_json(os.path.join(run_dir, "args.json")), []
        if not isinstance(args, dict):
            return None
    resumable = has_checkpoint or os.path.isfile(os.path.join(run_dir, PROGRESS_NAME))
    return RunRecord(run_settings(args, root), reads, False, resumable, bool(args.get("once")))


def stage_runs(stage_dir: str) -> list:
    """The run directories of a stage, newest first, then the hidden ones a staged run was being written in."""
    if not os.path.isdir(stage_dir):
        return []
    names = os.listdir(stage_dir)
    numbered = sorted((name for name in names if re.match(r"\d{5}-", name)), reverse=True)
    partial = sorted(name for name in names if name.startswith(".partial-"))
    return [os.path.join(stage_dir, name) for name in numbered + partial
            if os.path.isdir(os.path.join(stage_dir, name)) and not os.path.islink(os.path.join(stage_dir, name))]


def previous_runs(args, stage: str, resumable: bool) -> Previous:
    """This stage's runs under --out with the settings of `args` that still read what `args` reads (`still_read`).
    `resumable`: whether an unfinished run with a checkpoint or its progress is continued or started again."""
    root = args.out
    settings = run_settings(vars(args), root)
    previous = Previous()
    for run_dir in stage_runs(os.path.join(root, stage)):
        record = run_record(run_dir, root)
        if record is None or record.settings != settings or not still_read(record.reads, settings, root):
            continue
        if record.finished:
            previous.finished = previous.finished or run_dir
        elif resumable and record.resumable:
            previous.interrupted = previous.interrupted or run_dir
        elif record.once:
            previous.stale.append(run_dir)
    return previous


def skip_if_finished(previous: Previous, stage: str):
    """Raise `NothingToDo` when a run finished with these settings, `latest` pointing at it again (the next stage
    reads it, as if it had just been run)."""
    if previous.finished:
        latest = os.path.join(os.path.dirname(previous.finished), "latest")
        if is_writer() and os.path.realpath(latest) != os.path.realpath(previous.finished):
            mark_latest(previous.finished)
        if is_writer():
            remove_partial_writes(os.path.dirname(previous.finished))
        raise NothingToDo(f"{stage}: skipped: {previous.finished} finished with these settings (--once); "
                          f"{stage}/latest points at it")


def clear_the_way(args, stage: str):
    """--once before a new run: `NothingToDo` where a run finished with these settings; unfinished --once runs of
    these settings with nothing to resume (killed before their first checkpoint, or in a stage that cannot resume)
    are removed, so that the new run takes their place and number."""
    previous = previous_runs(args, stage, resumable=False)
    skip_if_finished(previous, stage)
    for run_dir in previous.stale:
        print(f"{stage}: removing {run_dir}, left unfinished with these settings (--once): starting again", flush=True)
        shutil.rmtree(run_dir)
    if os.path.isdir(os.path.join(args.out, stage)):
        remove_partial_writes(os.path.join(args.out, stage))


def remove_partial_writes(directory: str):
    """The leftovers in `directory` of writes a kill cut short: `*.tmp.<pid>` files (utils/run/files.py) and
    `.latest.<pid>` links (`mark_latest`). Called on a stage's own directories only, one pipeline per --out."""
    for name in os.listdir(directory):
        if re.search(r"\.tmp\.\d+$", name) or re.fullmatch(r"\.latest\.\d+", name):
            os.remove(os.path.join(directory, name))
