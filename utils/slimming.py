"""GAN Slimming (docs/DESIGN.md, "GAN Slimming and compression"): the student's step, the L1 proximal step on
the channel scales and dead channels.

The channel scales are the gammas (weights) of the `PrunableBatchNorm2d` of every block in `PRUNABLE_LAYERS`.
After each optimiser step they are soft-thresholded, `g <- sign(g) * max(|g| - lr * rho, 0)`. A channel whose
gamma is exactly 0 is dead for good: `alive` is cleared, gamma and beta are pinned to 0 (so the channel outputs
exactly 0 and compression can drop it without changing the function) and its optimiser state is zeroed.
`SlimmingStep` is the student's step for `utils.trainer.Trainer`: the discriminator's real samples are the stored
teacher images with their labels, and the student's loss is beta * distillation + GAN loss (non-saturating, or the
recipe's `--loss`, with its `--augment` on teacher and student images alike).
"""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from utils.gan import d_loss, g_loss
from utils.trainer import TrainingStep
from utils.training import batches_from

DISTILL_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}


def prunable_norms(generator_model) -> list:
    return [block.norm for block in generator_model.blocks()]


def gamma_parameters(generator_model) -> list:
    """The channel scales (the L1-penalised parameters), one tensor per prunable layer."""
    return [norm.weight for norm in prunable_norms(generator_model)]


def other_parameters(generator_model) -> list:
    """Every generator parameter that is not a channel scale."""
    gammas = {id(p) for p in gamma_parameters(generator_model)}
    return [p for p in generator_model.parameters() if id(p) not in gammas]


@torch.no_grad()
def soft_threshold(values: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.sign(values) * torch.clamp(values.abs() - threshold, min=0.0)


@torch.no_grad()
def proximal_step(generator_model, lr: float, rho: float):
    """The L1 proximal step on every gamma (threshold lr * rho), then mark the channels it zeroed as dead."""
    for gamma in gamma_parameters(generator_model):
        gamma.copy_(soft_threshold(gamma, lr * rho))
    mark_dead(generator_model)


@torch.no_grad()
def mark_dead(generator_model):
    """A channel whose gamma is exactly 0 is dead (and stays dead: `alive` is never set back)."""
    for norm in prunable_norms(generator_model):
        norm.alive &= norm.weight != 0


@torch.no_grad()
def enforce_dead(generator_model, optimizers=()):
    """Pin dead channels' gamma and beta to 0 and zero their optimiser state (momentum, Adam moments), so that
    no stale momentum can move them off 0 again. Call after every optimiser step."""
    for norm in prunable_norms(generator_model):
        norm.enforce_dead()
        dead = ~norm.alive
        for optimizer in optimizers:
            for param in (norm.weight, norm.bias):
                for value in optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value.masked_fill_(dead, 0.0)


@dataclass(frozen=True)
class SlimmingConfig:
    """The student's loss: rho (L1 weight on the channel scales), beta (distillation over GAN loss)."""
    rho: float
    beta: float
    distill_loss: str = "l1"

    @classmethod
    def from_args(cls, args) -> "SlimmingConfig":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def slimming_step(G, D, optimizers: dict, batch, beta: float, rho: float, distill_loss: str = "l1",
                  recipe=None) -> dict:
    """One discriminator and one student update on a batch (z, labels, teacher images), then the L1 proximal
    step on the channel scales and the pinning of dead channels. `optimizers`: "d", "g" (Adam, the student's
    other weights) and "gamma" (SGD, the channel scales)."""
    z, labels, target = batch
    fake = G(z, labels)
    optimizers["d"].zero_grad(set_to_none=True)
    if recipe is None:  # teacher images are the real ones
        discriminator_loss = d_loss(D(target, labels), D(fake.detach(), labels))
    else:  # the recipe's loss and augmentation (utils/recipe.py)
        discriminator_loss = recipe.d_loss(D, target, labels, fake.detach(), labels)
    discriminator_loss.backward()
    optimizers["d"].step()

    distill = DISTILL_LOSSES[distill_loss](fake, target)
    adversarial = g_loss(D(fake, labels)) if recipe is None else recipe.g_loss(D, fake, labels)
    optimizers["g"].zero_grad(set_to_none=True)
    optimizers["gamma"].zero_grad(set_to_none=True)
    (beta * distill + adversarial).backward()
    optimizers["g"].step()
    optimizers["gamma"].step()
    proximal_step(G, optimizers["gamma"].param_groups[0]["lr"], rho)
    enforce_dead(G, (optimizers["g"], optimizers["gamma"]))
    return {"d_loss": discriminator_loss.item(), "g_loss": adversarial.item(), "distill_loss": distill.item()}


class SlimmingStep(TrainingStep):
    """The student's step over the distillation set's `batches` (EpochBatches of (z, label, teacher image))."""
    name = "student"

    def __init__(self, G, D, optimizers: dict, batches, epochs: int, ledger: dict, config: SlimmingConfig,
                 device, recipe=None):
        self.generator, self.discriminator, self.optimizers = G, D, optimizers
        self.epoch_batches, self.ledger, self.config, self.device = batches, ledger, config, device
        self.steps_per_epoch = len(batches)
        self.planned_steps = epochs * len(batches)
        self.recipe = recipe  # the GAN loss and augmentation of the adversarial part

    def batches(self, start: int, total: int):
        return batches_from(self.epoch_batches, start, total)

    def begin(self, step: int) -> dict:
        return {"step": 0, "active_channels": self.generator.active_channels()} if step == 0 else {}

    def optimize_parameters(self, batch, step: int) -> dict:
        c = self.config
        return slimming_step(self.generator, self.discriminator, self.optimizers,
                             [t.to(self.device) for t in batch], c.beta, c.rho, c.distill_loss, self.recipe)

    def log_fields(self) -> dict:
        return {"active_channels": self.generator.active_channels()}

    def postfix(self) -> dict:
        return {"active": sum(self.generator.active_channels())}

    def rng_states(self) -> dict:
        return {"torch": torch.get_rng_state()}

    def extra_state(self) -> dict:
        return {} if self.recipe is None else {"recipe": self.recipe.state_dict()}

    def restore(self, checkpoint: dict):
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if self.recipe is not None and "recipe" in checkpoint:
            self.recipe.load_state_dict(checkpoint["recipe"])
