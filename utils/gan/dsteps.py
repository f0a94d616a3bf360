"""How many discriminator steps per generator step: constant, or Bie, Kamath & Zhang's adaptive schedule.

Adaptive (Bie et al. 2023, section 5; their code's defaults): before every generator step, measure D's accuracy
on a batch of fresh fakes (the share it calls fake, logit < 0) and keep an exponential moving average of it
(beta 0.99). When the average has dropped to `threshold` (0.6) and at least `grace` (200) generator steps have
passed since the last change, move one rung up the ladder 1, 2, 5, 10, 20, 50, 100. Under DP this costs no
privacy: the accuracy is measured on generated samples only, never on the private split. The schedule's state
goes into the checkpoint so a resumed run continues with the same rung and average.
"""
from dataclasses import asdict, dataclass

import torch

from utils.gan.steps import random_inputs

LADDER = (1, 2, 5, 10, 20, 50, 100)


@dataclass
class DStepsSchedule:
    """`d_steps` discriminator steps per generator step; with `adaptive`, the rung of LADDER moves up."""
    d_steps: int = 1
    adaptive: bool = False
    threshold: float = 0.6
    beta: float = 0.99
    grace: int = 200
    average: float = None  # EMA of D's accuracy on fakes (None before the first generator step)
    since_change: int = 0  # generator steps since the last move up the ladder

    def __post_init__(self):
        if self.adaptive and self.d_steps not in LADDER:
            raise ValueError(f"the adaptive schedule starts on a rung of {LADDER}, got {self.d_steps}")

    def after_g_step(self, fake_accuracy: float = None) -> int:
        """Record D's accuracy on fakes measured before this generator step; return the (new) d_steps."""
        if not self.adaptive:
            return self.d_steps
        self.average = fake_accuracy if self.average is None else (
            self.beta * self.average + (1 - self.beta) * fake_accuracy)
        self.since_change += 1
        if self.since_change >= self.grace and self.average <= self.threshold and self.d_steps < LADDER[-1]:
            self.d_steps = LADDER[LADDER.index(self.d_steps) + 1]
            self.since_change = 0
        return self.d_steps

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict):
        for key, value in state.items():
            setattr(self, key, value)


@torch.no_grad()
def fake_accuracy(G, D, n: int, rng: torch.Generator, device) -> float:
    """Share of n fresh fakes (uniform random labels) that D calls fake (logit < 0); reads no real data."""
    z, labels = random_inputs(G, n, rng, device)
    was_training = G.training
    G.eval()
    logits = D(G(z, labels), labels)
    G.train(was_training)
    return float((logits < 0).float().mean())
