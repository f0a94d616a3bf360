"""GAN Slimming (docs/DESIGN.md, "GAN Slimming and compression"): the student's step, the L1 proximal step on
the channel scales and dead channels.

The channel scales are the gammas (weights) of the `PrunableBatchNorm2d` of every block in `PRUNABLE_LAYERS`.
After each optimiser step they are soft-thresholded, `g <- sign(g) * max(|g| - lr * rho, 0)`. A channel whose
gamma is exactly 0 is dead for good: `alive` is cleared, gamma and beta are pinned to 0 (so the channel outputs
exactly 0 and compression can drop it without changing the function) and its optimiser state is zeroed.

Uniform L1 (GAN Slimming) gives every channel the same threshold. The cost-weighted options (`channel_costs`,
`PENALTY_COSTS`) scale each channel's threshold by what the channel carries in the network as it is now (live
widths), normalised so that the mean weight over the live channels is 1, so rho keeps its meaning: penalty "cost",
its share of the parameters plus its share of the multiply-accumulates (its own conv output channel and the next
layer's input channel); penalty "params", its share of the parameters only (what the compact model's bytes count).

`SlimmingStep` is the student's step for `utils.run.trainer.Trainer`: the discriminator's real samples are the stored
teacher images with their labels, and the student's loss is beta * distillation + GAN loss (non-saturating, or the
recipe's `--loss`, with its `--augment` on teacher and student images alike).
"""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from models import PRUNABLE_LAYERS
from utils.gan.steps import d_loss, g_loss, generate
from utils.run.distributed import global_mean
from utils.run.lifecycle import batches_from
from utils.run.precision import FP32
from utils.run.trainer import TrainingStep

DISTILL_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}
PENALTIES = ("uniform", "cost", "params")  # L1 weight per channel: the same for all, or by the channel's cost


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
def proximal_step(generator_model, lr: float, rho: float, weights: list = None):
    """The L1 proximal step on every gamma (threshold lr * rho, times the layer's weight from `channel_costs` when
    given), then mark the channels it zeroed as dead."""
    weights = weights or [1.0] * len(PRUNABLE_LAYERS)
    for gamma, weight in zip(gamma_parameters(generator_model), weights):
        gamma.copy_(soft_threshold(gamma, lr * rho * weight))
    mark_dead(generator_model)


@dataclass
class ChannelCost:
    """How a channel's cost mixes its share of the parameters and its share of the MACs."""
    params: float = 1.0
    macs: float = 1.0


def _conv_geometry(conv, size_in: int) -> tuple:
    """(weights per (input, output) channel pair, output side) of a conv or transposed conv."""
    kh, kw = conv.kernel_size
    if isinstance(conv, torch.nn.ConvTranspose2d):
        size_out = (size_in - 1) * conv.stride[0] - 2 * conv.padding[0] + kh
    else:
        size_out = (size_in + 2 * conv.padding[0] - kh) // conv.stride[0] + 1
    return kh * kw, size_out


# What each cost-weighted penalty counts (`channel_costs`); "uniform" has no entry: the same weight for every channel
PENALTY_COSTS = {"cost": ChannelCost(), "params": ChannelCost(params=1.0, macs=0.0)}


def layer_costs(generator_model) -> list:
    """Per prunable layer, (parameters, MACs per image) that one of its live channels carries: its column of its
    own conv and its slice of the next conv's input, plus its BatchNorm gamma and beta."""
    convs = [block.conv for block in generator_model.blocks()] + [generator_model.to_image]
    live = [max(1, n) for n in generator_model.active_channels()]
    widths = [convs[0].in_channels] + live + [convs[-1].out_channels]
    size, taps, sizes_in = 1, [], []
    for conv in convs:
        sizes_in.append(size)
        kernel, size = _conv_geometry(conv, size)
        taps.append(kernel)
    costs = []
    for i in range(len(live)):
        own, nxt = widths[i] * taps[i], widths[i + 2] * taps[i + 1]
        # a transposed conv's MACs scale with its input pixels, a conv's with its output pixels
        own_pixels = sizes_in[i] ** 2 if isinstance(convs[i], torch.nn.ConvTranspose2d) else sizes_in[i + 1] ** 2
        next_pixels = (sizes_in[i + 1] ** 2 if isinstance(convs[i + 1], torch.nn.ConvTranspose2d)
                       else _conv_geometry(convs[i + 1], sizes_in[i + 1])[1] ** 2)
        costs.append((own + nxt + 2, own * own_pixels + nxt * next_pixels))
    return costs


def channel_costs(generator_model, cost: ChannelCost = ChannelCost()) -> list:
    """Per prunable layer, the L1 weight of each of its channels: cost.params x (parameter share) + cost.macs x
    (MAC share), normalised to mean 1 over the live channels."""
    costs = layer_costs(generator_model)
    live = [max(1, n) for n in generator_model.active_channels()]
    total_params = sum(n * p for n, (p, _) in zip(live, costs))
    total_macs = sum(n * m for n, (_, m) in zip(live, costs))
    raw = [cost.params * p / total_params + cost.macs * m / total_macs for p, m in costs]
    mean = sum(n * r for n, r in zip(live, raw)) / sum(live)
    return [r / mean for r in raw]


def penalty_weights(generator_model, penalty: str):
    """Per prunable layer, the L1 weight of each channel under `penalty` (None for "uniform": weight 1)."""
    cost = PENALTY_COSTS.get(penalty)
    return None if cost is None else channel_costs(generator_model, cost)


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


@torch.no_grad()
def eval_distill_loss(G, distill, loss: str = "l1", batch_size: int = 500, device="cpu", count: int = 2000) -> float:
    """The distillation loss `loss` of G in eval mode (stored quantisation scales, BatchNorm running stats) on the
    first `count` triples of the distillation set (the same ones for every student of the set)."""
    z, labels, target = distill.batch(range(min(count, len(distill))))
    fake = generate(G, z, labels, batch_size=batch_size, device=device)
    return DISTILL_LOSSES[loss](fake, target).item()


@dataclass(frozen=True)
class SlimmingConfig:
    """The student's loss: rho (L1 weight on the channel scales), beta (distillation over GAN loss), penalty
    ("uniform": the same L1 weight for every channel; "cost" or "params": weighted by `penalty_weights`)."""
    rho: float
    beta: float
    distill_loss: str = "l1"
    penalty: str = "uniform"

    @classmethod
    def from_args(cls, args) -> "SlimmingConfig":
        # a run saved before a field existed (resume) gets the field's default
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def slimming_step(G, D, optimizers: dict, batch, beta: float, rho: float, distill_loss: str = "l1",
                  penalty: str = "uniform", recipe=None, precision=FP32) -> dict:
    """One discriminator and one student update on a batch (z, labels, teacher images), then the L1 proximal
    step on the channel scales (weighted per layer by `penalty_weights` unless `penalty` is "uniform") and the pinning
    of dead channels. `optimizers`: "d", "g" (Adam, the student's other weights) and "gamma" (SGD, the scales).
    The forward passes run in `precision` (utils/run/precision.py); losses and updates in float32."""
    z, labels, target = batch
    forward_g, forward_d = precision.wrap(G), precision.wrap(D)
    fake = forward_g(z, labels)
    optimizers["d"].zero_grad(set_to_none=True)
    if recipe is None:  # teacher images are the real ones
        discriminator_loss = d_loss(forward_d(target, labels), forward_d(fake.detach(), labels))
    else:  # the recipe's loss and augmentation (utils/gan/recipe.py)
        discriminator_loss = recipe.d_loss(forward_d, target, labels, fake.detach(), labels)
    discriminator_loss.backward()
    optimizers["d"].step()

    distill = DISTILL_LOSSES[distill_loss](fake, target)
    adversarial = g_loss(forward_d(fake, labels)) if recipe is None else recipe.g_loss(forward_d, fake, labels)
    optimizers["g"].zero_grad(set_to_none=True)
    optimizers["gamma"].zero_grad(set_to_none=True)
    (beta * distill + adversarial).backward()
    optimizers["g"].step()
    optimizers["gamma"].step()
    weights = penalty_weights(G, penalty)
    proximal_step(G, optimizers["gamma"].param_groups[0]["lr"], rho, weights)
    enforce_dead(G, (optimizers["g"], optimizers["gamma"]))
    return {"d_loss": global_mean(discriminator_loss.item()), "g_loss": global_mean(adversarial.item()),
            "distill_loss": global_mean(distill.item())}  # the global batch's (equal parts under torchrun)


class SlimmingStep(TrainingStep):
    """The student's step over the distillation set's `batches` (EpochBatches of (z, label, teacher image))."""
    name = "student"

    def __init__(self, G, D, optimizers: dict, batches, epochs: int, ledger: dict, config: SlimmingConfig,
                 device, recipe=None, precision=FP32):
        precision.prepare(G, D)
        self.generator, self.discriminator, self.optimizers, self.precision = G, D, optimizers, precision
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
                             [t.to(self.device) for t in batch], c.beta, c.rho, c.distill_loss, c.penalty,
                             self.recipe, self.precision)

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
