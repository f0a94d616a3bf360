"""GAN losses and the (non-private) training steps shared by the stages.

Non-saturating loss (Goodfellow et al. 2014) on logits. The generator is conditioned on labels drawn uniformly
at random, never on a real batch's labels: under DP the labels are private too (DESIGN section 4).
"""
import math

import torch
import torch.nn.functional as F

from utils.cli import UserError


class NonFiniteLoss(UserError):
    """A loss became NaN or Inf: the run stops, the last good checkpoint stays."""


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


def random_inputs(generator_model, n: int, rng: torch.Generator, device):
    """Latent vectors and uniform random labels for `n` fakes, drawn from `rng` (resume-safe)."""
    z = torch.randn(n, generator_model.nz, generator=rng)
    labels = torch.randint(0, generator_model.num_classes, (n,), generator=rng)
    return z.to(device), labels.to(device)


def discriminator_step(G, D, d_optimizer, real, real_labels, rng) -> float:
    """One discriminator update on a real batch and as many fresh fakes."""
    z, fake_labels = random_inputs(G, len(real), rng, real.device)
    with torch.no_grad():
        fake = G(z, fake_labels)
    d_optimizer.zero_grad(set_to_none=True)
    loss = d_loss(D(real, real_labels), D(fake, fake_labels))
    loss.backward()
    d_optimizer.step()
    return loss.item()


def generator_step(G, D, g_optimizer, batch_size, rng, device) -> float:
    """One generator update against the current discriminator (D's parameters get no update)."""
    z, labels = random_inputs(G, batch_size, rng, device)
    g_optimizer.zero_grad(set_to_none=True)
    loss = g_loss(D(G(z, labels), labels))
    loss.backward()
    g_optimizer.step()
    return loss.item()


def check_finite(step: int, **losses):
    bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
    if bad:
        raise NonFiniteLoss(f"non-finite loss at step {step} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
                            f"stopped, the last good checkpoint is kept")


def fixed_inputs(generator_model, per_class: int = 10, seed: int = 1234):
    """The same (z, label) every time: one row per class, `per_class` columns, for sample grids."""
    rng = torch.Generator().manual_seed(seed)
    labels = torch.arange(generator_model.num_classes).repeat_interleave(per_class)
    z = torch.randn(len(labels), generator_model.nz, generator=rng)
    return z, labels


@torch.no_grad()
def generate(G, z, labels, batch_size: int = 1000, device="cpu") -> torch.Tensor:
    """Images of G in eval mode (restoring its mode after), on the CPU."""
    was_training = G.training
    G.eval()
    out = torch.cat([G(z[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)).cpu()
                     for i in range(0, len(z), batch_size)])
    G.train(was_training)
    return out
