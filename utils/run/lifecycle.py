"""The life cycle of a run, the same in all six scripts (docs/DESIGN.md, "The run life cycle").

    args, checkpoint = resume_args(args, STAGE)      # 1. nothing on disk yet: every refusal happens before 3
    ...load and check every input...                  # 2. may raise UserError
    run = Run.open(args, STAGE, desc, checkpoint)     # 3. the run directory, args.json, metrics.jsonl
    run.metrics.append(step=..., ...)                 # 4. append-only metrics
    run.save(checkpoint)                              # 5. atomic; `latest` moves only to a complete checkpoint
    return run.finish("summary")                      # 6. one line naming the run directory

A resumed run reopens its own directory and cuts its metrics back to the checkpoint's step; a staged run (the
distillation set) is built in a hidden directory and `publish`ed under its number only once complete. A finished
run says so, with its settings and the runs it read, in `finished.json`.

With --once (make pipeline, make reproduce) steps 1 and 3 first look at the stage's earlier runs (utils/run/once.py):
a run finished with the same settings ends the stage, an interrupted one is resumed (an evaluation, which has no
training checkpoint, continues from its progress: `interrupted_run`, `Run.reopen`), and an unfinished one with
nothing to resume is started again in its place.
"""
import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, fields

from tqdm import tqdm

from utils.run.checkpoint import (CHECKPOINT_NAME, MetricsLog, latest_run, load_checkpoint, mark_latest, new_run_dir,
                                  pipeline_root, save_checkpoint)
from utils.run.cli import print_config
from utils.run.distributed import NoMetrics, from_writer, is_writer
from utils.run.files import write_json
from utils.run.once import (FINISHED_NAME, clear_the_way, previous_runs, remove_partial_writes, run_reads,
                            run_settings, skip_if_finished)

# flags taken from the command line on --resume (unless left unset, None: the run keeps its own); everything else
# comes from the run's saved args. The precision is how this process computes, not what the run is.
RESUME_OVERRIDES = ("resume", "max_steps", "device", "dry_run", "precision", "once")


@dataclass(frozen=True)
class TrainConfig:
    """The loop settings of a training stage, built once from the command line (`TrainConfig.from_args`)."""
    batch_size: int
    epochs: float
    seed: int = 0
    max_steps: int = None  # stop early (quick runs, tests); None: the whole planned run
    log_every: int = 50
    checkpoint_every: int = 500
    snapshot_steps: tuple = ()  # steps whose checkpoint is also kept as `snapshot_file(step)`

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        # a stage without a setting (or a run saved before it existed) gets the field's default
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, "snapshot_steps": tuple(values.get("snapshot_steps") or ())})

    def total_steps(self, planned: int) -> int:
        return planned if self.max_steps is None else min(planned, self.max_steps)


def resume_args(args: argparse.Namespace, stage: str):
    """(args, checkpoint): with --resume, the run's saved args (but RESUME_OVERRIDES, and --out: the pipeline the
    run now lies in) and its last checkpoint; otherwise (args, None). With --once (and no --resume), the same for
    an interrupted run of these settings, and `NothingToDo` for a finished one. Touches nothing on disk but
    `latest` (moved back to a finished run that --once skips)."""
    if not getattr(args, "resume", None):
        interrupted = interrupted_run(args, stage)
        if interrupted:
            args = argparse.Namespace(**{**vars(args), "resume": interrupted})
    if not getattr(args, "resume", None):
        return args, None
    path = latest_run(args.out, stage) if args.resume == "latest" else args.resume
    checkpoint = load_checkpoint(path, stage)
    saved = dict(checkpoint["args"])
    # the command line wins for RESUME_OVERRIDES, except a flag left unset (--max-steps: the run keeps its own stop)
    saved.update({key: getattr(args, key) for key in RESUME_OVERRIDES if getattr(args, key, None) is not None})
    saved["out"] = pipeline_root(checkpoint["run_dir"])
    return argparse.Namespace(**saved), checkpoint


def skip_if_done(args, stage: str):
    """With --once: `NothingToDo` at once where a run of these settings finished, before any input is loaded (a stage
    that computes before its first write, compress_student.py, took 24 s to learn that it had nothing to do)."""
    if getattr(args, "once", False):
        skip_if_finished(previous_runs(args, stage, resumable=False), stage)


def interrupted_run(args, stage: str, holding: str = CHECKPOINT_NAME):
    """With --once: the directory of an interrupted run of these settings that holds `holding` (a training stage's
    checkpoint, or an evaluation's PROGRESS_NAME, continued with `Run.reopen`), announced; None where there is none
    (or without --once); `NothingToDo` for a finished one."""
    if not getattr(args, "once", False):
        return None
    previous = previous_runs(args, stage, resumable=True)
    skip_if_finished(previous, stage)
    if previous.interrupted and os.path.isfile(os.path.join(previous.interrupted, holding)):
        print(f"{stage}: continuing {previous.interrupted}, interrupted with these settings (--once)", flush=True)
        return previous.interrupted
    return None


def maybe_dry_run(args) -> bool:
    if args.dry_run:
        print_config(args)
    return args.dry_run


class Run:
    """One run directory of a stage: where its files go, its metrics log, its checkpoints."""

    def __init__(self, run_dir: str, stage: str, checkpoint: dict = None, publish_as: tuple = None,
                 writer: bool = True):
        self.run_dir, self.stage, self.writer = run_dir, stage, writer
        self.checkpoint = checkpoint  # the checkpoint a resumed run continues from; None for a new run
        self.publish_as = publish_as  # a staged run: (out, desc) of the numbered directory `publish` moves it to
        self.metrics = MetricsLog(run_dir) if writer else NoMetrics()
        self.settings, self.reads, self.started = None, [], time.time()  # for finished.json (`finish`)

    @classmethod
    def open(cls, args, stage: str, desc: str, checkpoint: dict = None, staged: bool = False) -> "Run":
        """A new numbered run directory with args.json (`staged`: a hidden one, see `publish`), or the resumed
        run's own directory with its metrics cut back to the checkpoint's step. Call only once the input has
        been checked: this is the first write under --out. Under torchrun rank 0 alone writes: the other ranks
        get a Run of rank 0's directory that writes nothing."""
        if not is_writer():
            return cls(from_writer(None), stage, checkpoint, writer=False)
        if checkpoint is None and getattr(args, "once", False):
            clear_the_way(args, stage)
        run = cls._open(args, stage, desc, checkpoint, staged)
        run.settings = run_settings(vars(args), args.out)
        from_writer(run.run_dir)
        return run

    @classmethod
    def reopen(cls, args, stage: str, run_dir: str) -> "Run":
        """The directory of an interrupted run that kept its progress (`interrupted_run`), continued as it
        is: its files stay, the leftovers of writes cut short go."""
        for directory in (run_dir, os.path.dirname(run_dir)):
            remove_partial_writes(directory)
        run = cls(run_dir, stage)
        run.settings = run_settings(vars(args), args.out)
        from_writer(run.run_dir)
        return run

    @classmethod
    def _open(cls, args, stage: str, desc: str, checkpoint: dict, staged: bool) -> "Run":
        if checkpoint is not None:
            run = cls(checkpoint["run_dir"], stage, checkpoint)
            run.metrics.truncate_after(checkpoint["step"])
            if getattr(args, "once", False):
                for directory in (run.run_dir, os.path.dirname(run.run_dir)):
                    remove_partial_writes(directory)
            return run
        desc = args.desc or desc
        if staged:
            stage_dir = os.path.join(args.out, stage)
            os.makedirs(stage_dir, exist_ok=True)
            run_dir = tempfile.mkdtemp(prefix=".partial-", dir=stage_dir)  # never numbered: never taken for a run
            os.chmod(run_dir, 0o755)  # mkdtemp makes it private; a run directory is not
        else:
            run_dir = new_run_dir(args.out, stage, desc)
        write_json(os.path.join(run_dir, "args.json"), vars(args))
        return cls(run_dir, stage, publish_as=(args.out, desc) if staged else None)

    def publish(self):
        """Move a staged run, now complete, to its numbered place (a rename onto a freshly reserved, empty
        directory: atomic on POSIX)."""
        out, desc = self.publish_as
        run_dir = new_run_dir(out, self.stage, desc)
        os.replace(self.run_dir, run_dir)
        self.run_dir, self.metrics = run_dir, MetricsLog(run_dir)

    def discard(self):
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def save(self, checkpoint: dict):
        """Save the checkpoint atomically, then point `latest` at this run (only ever at a complete one)."""
        if not self.writer:
            return
        save_checkpoint(self.run_dir, checkpoint)
        mark_latest(self.run_dir)
        self.reads = run_reads(checkpoint, pipeline_root(self.run_dir))

    def save_snapshot(self, checkpoint: dict) -> str:
        """Keep the checkpoint of this step beside the run's own, as `snapshot_file(step)` (atomic; `latest` and
        `checkpoint.pt` do not move): a file that `evaluate.py --runs` and `load_checkpoint` read."""
        if self.writer:
            return save_checkpoint(self.run_dir, checkpoint, name=snapshot_file(checkpoint["step"]))
        return None

    def finish(self, summary: str) -> str:
        """The run's last words: `finished.json` (that it finished, with which settings, from which runs, in how
        long), what it did, and where it is (rank 0 alone under torchrun)."""
        if self.writer:
            write_json(self.path(FINISHED_NAME), {"stage": self.stage, "summary": summary, "settings": self.settings,
                                                  "reads": self.reads,
                                                  "elapsed_s": round(time.time() - self.started, 1)})
            tqdm.write(f"{self.stage}: {summary}\n{self.stage}: run directory {self.run_dir}")
        return self.run_dir


def snapshot_file(step: int) -> str:
    """The file name of a run's snapshot at `step` (in the run directory, so its paths resolve as the run's)."""
    return f"snapshot-{step:06d}.pt"


def batches_from(batches, step: int, total: int):
    """Batches from optimiser step `step` up to `total`: a resumed run sees the same batches in the same order as
    an uninterrupted one (the epoch order comes from the epoch number, not from saved state)."""
    while step < total:
        epoch, start = divmod(step, len(batches))
        for batch in batches.epoch(epoch, start):
            yield batch
            step += 1
            if step >= total:
                return


def checkpoint_due(step: int, total: int, steps_per_epoch: int, every: int) -> bool:
    """Checkpoint every `every` steps, at each epoch end and at the last step."""
    return step % every == 0 or step % steps_per_epoch == 0 or step == total
