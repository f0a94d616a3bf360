"""The one GAN training loop of the teacher, student and DP stages (docs/DESIGN.md, "The training loop").

In the spirit of gan-compression's `Trainer` / `optimize_parameters`: the loop owns what every stage does the
same way (step counting, epochs, progress, metrics records, checkpoint cadence, resuming, refusing a non-finite
loss); the stage plugs in a *step* object that owns its networks, optimisers and data:

    name, steps_per_epoch, planned_steps        labels and the length of the planned run
    generator, models(), optimizers, ledger     what a checkpoint saves (models(): name -> network)
    batches(start, total)                       the inputs of steps start+1 .. total, resume-exact
    optimize_parameters(batch, step) -> losses  one step; `step` counts from 1
    log_fields() -> dict                        added to every metrics record
    milestone(step, boundary) -> dict           records that force a metrics line (epsilon at epoch ends)
    begin(step) -> dict                         called once before the first step; a metrics record or {}
    rng_states(), restore(checkpoint)           the step's random state, and resuming it
    extra_state() -> dict                       the step's own checkpoint entries

The three steps: `utils.gan.steps.NonPrivateStep` (teacher), `utils.compression.slimming.SlimmingStep` (student) and
`utils.privacy.dp.DPStep` (DP teacher, DP fine-tuning).
"""
import math

from utils.run.checkpoint import checkpoint_fields, contiguous_optimizer_state
from utils.run.cli import UserError, progress_bar
from utils.run.distributed import is_writer
from utils.run.lifecycle import Run, TrainConfig, checkpoint_due


class NonFiniteLoss(UserError):
    """A loss became NaN or Inf: the run stops, the last good checkpoint stays."""


def check_finite(step: int, **losses):
    bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
    if bad:
        raise NonFiniteLoss(f"non-finite loss at step {step} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
                            f"stopped, the last good checkpoint is kept")


class TrainingStep:
    """The base of the three steps: every hook the loop calls, with the defaults most steps keep."""
    name: str
    steps_per_epoch: int
    planned_steps: int
    optimizers: dict
    ledger: dict

    def models(self) -> dict:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def sampling_generator(self):
        """The generator that samples and later stages use (a step with a weight average returns the average)."""
        return self.generator

    def begin(self, step: int) -> dict:
        return {}

    def log_fields(self) -> dict:
        return {}

    def milestone(self, step: int, boundary: bool) -> dict:
        return {}

    def postfix(self) -> dict:
        return {}

    def extra_state(self) -> dict:
        return {}


class Trainer:
    """Runs a step object to the planned (or --max-steps) number of steps, checkpointing into `run`."""

    def __init__(self, step, run: Run, config: TrainConfig, *, args, parent=None, data=None, extra: dict = None):
        self.impl, self.run, self.config = step, run, config
        self.fields = {"stage": run.stage, "args": args, "parent": parent, "data": data}
        self.extra = extra or {}
        self.total = config.total_steps(step.planned_steps)
        self.step, self.start, self.losses = 0, 0, {}
        checkpoint = run.checkpoint
        if checkpoint is not None:
            for name, optimizer in step.optimizers.items():
                optimizer.load_state_dict(checkpoint["optimizers"][name])
            step.restore(checkpoint)
            self.step = self.start = checkpoint["step"]

    def checkpoint(self) -> dict:
        self.impl.generator.refresh_quant_scales()  # eval mode uses the stored scales: match the saved weights
        own = self.impl.extra_state()  # first: it may bring the ledger up to date
        checkpoint = checkpoint_fields(**self.fields, step=self.step, models=self.impl.models(),
                                       ledger=self.impl.ledger)
        optimizers = {name: contiguous_optimizer_state(opt) for name, opt in self.impl.optimizers.items()}
        checkpoint.update(optimizers=optimizers, rng=self.impl.rng_states(), **own, **self.extra)
        return checkpoint

    def save(self):
        self.run.save(self.checkpoint())

    def epoch(self) -> int:
        return (self.step - 1) // self.impl.steps_per_epoch if self.step else 0

    def after_step(self):
        """The metrics record and the checkpoint that are due after step `self.step`."""
        boundary = self.step % self.impl.steps_per_epoch == 0 or self.step == self.total
        milestone = self.impl.milestone(self.step, boundary)
        if milestone or self.step % self.config.log_every == 0 or self.step == self.total:
            self.run.metrics.append(step=self.step, epoch=self.epoch(), **self.losses, **self.impl.log_fields(),
                                    **milestone)
        if checkpoint_due(self.step, self.total, self.impl.steps_per_epoch, self.config.checkpoint_every):
            self.save()
        if self.step in self.config.snapshot_steps:
            self.run.save_snapshot(self.checkpoint())

    def fit(self) -> int:
        """Train to the end; a resumed run with nothing left still saves, so that `latest` points at it."""
        first_record = self.impl.begin(self.step)
        if first_record:
            self.run.metrics.append(**first_record)
        progress = progress_bar(total=self.total, initial=self.step, desc=self.impl.name, disable=not is_writer())
        for batch in self.impl.batches(self.step, self.total):
            self.losses = self.impl.optimize_parameters(batch, self.step + 1)
            check_finite(self.step + 1, **self.losses)
            self.step += 1
            self.after_step()
            progress.set_postfix(epoch=self.epoch(), **{k: f"{v:.3f}" for k, v in self.losses.items()},
                                 **self.impl.postfix(), refresh=False)  # shown at the bar's own interval
            progress.update(1)
        progress.close()
        if self.run.checkpoint is not None and self.step == self.start:
            self.save()
        return self.step
