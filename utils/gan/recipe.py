"""The training recipe of a GAN stage as one settings object and one runtime object (docs/DESIGN.md,
"The training loop").

`RecipeConfig` holds what a stage's command line chooses: the loss (utils/gan/losses.py), the DiffAugment policy
(utils/gan/augment.py), the generator weight average (utils/gan/ema.py) and the D-steps schedule (utils/gan/dsteps.py).
`Recipe` is that configuration at run time for one generator: it computes the losses with augmentation applied to
real and fake alike, says when a generator step is due, updates the weight average and the schedule after it, and
saves and restores their state. Its random draws (augmentations, the schedule's probe fakes) come from its own
generator, so a run with every option off draws exactly what it drew before the recipe existed.
"""
import argparse
from dataclasses import dataclass

import torch

from utils.gan.augment import diff_augment, parse_policy
from utils.gan.dsteps import LADDER, DStepsSchedule, fake_accuracy
from utils.gan.ema import WeightAverage
from utils.gan.losses import GAN_LOSSES

RECIPE_SEED_OFFSET = 15485863  # the recipe's random stream differs from the training stream of --seed
# The teacher's default weight average: with it, recall rose in both probes of benchmarks/results/recipe.md
# (0.063 -> 0.108, 0.037 -> 0.084) at equal or better downstream accuracy.
TEACHER_EMA_DECAY = 0.995


@dataclass(frozen=True)
class RecipeConfig:
    loss: str = "non-saturating"
    augment: tuple = ()
    ema_decay: float = 0.0  # 0: no weight average
    d_steps: int = 1
    adaptive_d_steps: bool = False

    @classmethod
    def from_args(cls, args, **defaults):
        """From a parsed command line, or from a resumed run's saved args (which may predate these options); an
        option that is absent or None takes `defaults`, else the class default."""
        values = {**vars(cls()), **defaults}
        values = {key: value if getattr(args, key, None) is None else getattr(args, key)
                  for key, value in values.items()}
        values["augment"] = parse_policy(values["augment"]) if isinstance(values["augment"], str) \
            else tuple(values["augment"])
        return cls(**values)


def add_recipe_args(parser, losses: bool = True, averaging: bool = True, ema_decay=0.0, ema_help: str = ""):
    """--loss and --augment (unless `losses` is False: the DP-only stage, whose private discriminator step keeps
    its loss); --ema-decay and --adaptive-d-steps (unless `averaging` is False: the student). The constant number
    of D steps per G step is the stage's own: 1, or the DP stages' --d-steps-per-g-step."""
    group = parser.add_argument_group("recipe")
    if losses:
        group.add_argument("--loss", choices=sorted(GAN_LOSSES), default="non-saturating",
                           help="GAN loss (non-private training only)")
        group.add_argument("--augment", type=_policy, default="none",
                           help="DiffAugment policy for every image D sees, real and fake: none, translation, "
                                "cutout or a comma-separated list (non-private training only)")
    if averaging:
        group.add_argument("--ema-decay", type=_decay, default=ema_decay,
                           help="generator weight average, decay min(this, (1+t)/(10+t)) at step t; it is what "
                                f"the checkpoint's generator holds; 0: none{ema_help}")
        group.add_argument("--adaptive-d-steps", action="store_true",
                           help=f"raise the D steps along {', '.join(map(str, LADDER))} when D's running accuracy "
                                "on fakes drops to 0.6 (Bie et al. 2023)")


def check_recipe_args(parser, args):
    """Refuse, as an argparse error (one line, exit 2, before anything is written), an adaptive D-steps schedule
    whose first rung is not on LADDER."""
    if getattr(args, "adaptive_d_steps", False) and args.d_steps_per_g_step not in LADDER:
        parser.error(f"--adaptive-d-steps: --d-steps-per-g-step must be one of {', '.join(map(str, LADDER))}, "
                     f"not {args.d_steps_per_g_step}")


def _policy(text: str) -> str:
    try:
        parse_policy(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))
    return text


def _decay(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a decay in [0, 1)")
    return value


class Recipe:
    """The recipe at run time for generator G: losses, augmentation, weight average and D-steps schedule."""

    def __init__(self, config: RecipeConfig, G, seed: int):
        self.config, self.loss = config, GAN_LOSSES[config.loss]
        self.average = WeightAverage(G, config.ema_decay) if config.ema_decay > 0 else None
        self.schedule = DStepsSchedule(config.d_steps, adaptive=config.adaptive_d_steps)
        self.rng = torch.Generator().manual_seed(seed + RECIPE_SEED_OFFSET)
        self.since_g_step = 0

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        return diff_augment(images, self.config.augment, self.rng)

    def d_views(self, real, fake) -> tuple:
        """The images a discriminator step shows D: real and fake augmented, real drawn first. A discriminator
        trained beside D (train_teacher.py --dp-d-channels) sees these same views: no draw of its own."""
        return self.augment(real), self.augment(fake)

    def d_loss(self, D, real, real_labels, fake, fake_labels) -> torch.Tensor:
        real, fake = self.d_views(real, fake)
        return self.loss.d(D(real, real_labels), D(fake, fake_labels))

    def g_loss(self, D, fake, labels) -> torch.Tensor:
        return self.loss.g(D(self.augment(fake), labels))

    def g_step_due(self) -> bool:
        """Call once after every discriminator step: True when the generator's turn has come."""
        self.since_g_step += 1
        if self.since_g_step < self.schedule.d_steps:
            return False
        self.since_g_step = 0
        return True

    def before_g_step(self, G, D, batch_size: int, device):
        """D's accuracy on fresh fakes, for the adaptive schedule (None when it is off: nothing is drawn)."""
        return fake_accuracy(G, D, batch_size, self.rng, device) if self.config.adaptive_d_steps else None

    def after_g_step(self, G, accuracy=None):
        if self.average is not None:
            self.average.update(G)
        self.schedule.after_g_step(accuracy)

    def log_fields(self) -> dict:
        """With the adaptive schedule, the metrics record's D steps per G step and D's running accuracy on fakes
        (what moves the rung), so that a reader sees whether and when it climbed; nothing otherwise."""
        if not self.config.adaptive_d_steps:
            return {}
        return {"d_steps": self.schedule.d_steps, "fake_accuracy": self.schedule.average}

    def sampling_generator(self, G):
        """What samples, checkpoints and later stages use: the weight average when there is one."""
        return self.average.model if self.average is not None else G

    def state_dict(self) -> dict:
        """Everything but the average's weights: the checkpoint's "generator" holds them (one place)."""
        average = None if self.average is None else {"step": self.average.step, "max_decay": self.average.max_decay}
        return {"rng": self.rng.get_state(), "since_g_step": self.since_g_step,
                "schedule": self.schedule.state_dict(), "average": average}

    def load_state_dict(self, state: dict, average_weights: dict = None):
        """Restore from `state_dict()`, the weight average's weights from `average_weights`."""
        self.rng.set_state(state["rng"])
        self.since_g_step = state["since_g_step"]
        self.schedule.load_state_dict(state["schedule"])
        if self.average is not None:
            self.average.load_state_dict({**state["average"], "model": average_weights})
