"""GAN Slimming's channel sparsity (DESIGN section 5): the L1 proximal step on the channel scales and dead channels.

The channel scales are the gammas (weights) of the `PrunableBatchNorm2d` of every block in `PRUNABLE_LAYERS`.
After each optimiser step they are soft-thresholded, `g <- sign(g) * max(|g| - lr * rho, 0)`. A channel whose
gamma is exactly 0 is dead for good: `alive` is cleared, gamma and beta are pinned to 0 (so the channel outputs
exactly 0 and compression can drop it without changing the function) and its optimiser state is zeroed.
"""
import torch


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

