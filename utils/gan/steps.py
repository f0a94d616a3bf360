"""GAN losses, the non-private training steps, and sampling helpers shared by the stages.

Non-saturating loss (Goodfellow et al. 2014) on logits. The generator is conditioned on labels drawn uniformly
at random, never on a real batch's labels: under DP the labels are private too (docs/DESIGN.md, "Privacy").
`NonPrivateStep` is the teacher's step for `utils.run.trainer.Trainer`; the DP loop's steps are in
`utils/privacy/dp.py`.
"""
import torch
import torch.nn.functional as F

from utils.run.checkpoint import DP_DISCRIMINATOR
from utils.run.distributed import global_mean, local_part, world_size
from utils.run.lifecycle import batches_from
from utils.run.precision import FP32
from utils.run.trainer import TrainingStep


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(-fake_logits).mean()


def random_inputs(generator_model, n: int, rng: torch.Generator, device):
    """Latent vectors and uniform random labels for `n` fakes, drawn from `rng` (resume-safe)."""
    z = torch.randn(n, generator_model.nz, generator=rng)
    labels = torch.randint(0, generator_model.num_classes, (n,), generator=rng)
    return z.to(device), labels.to(device)


def local_random_inputs(generator_model, n_global: int, rng: torch.Generator, device):
    """This process's part of the latent vectors and labels a single process would draw for `n_global` fakes.
    Under torchrun every rank draws all of them, so `rng` stays the same on every rank (rank 0's checkpoint
    resumes all); in a single process this is `random_inputs`."""
    z, labels = random_inputs(generator_model, n_global, rng, "cpu")
    return local_part(z).to(device), local_part(labels).to(device)


class SideDiscriminator:
    """A discriminator trained beside the step's own, on the very images of each of its steps (the same real batch,
    the same fakes, the same augmented views) with the same loss and precision, by its own optimiser
    (train_teacher.py --dp-d-channels: a narrow one for the DP stage; docs/DESIGN.md, "The training loop"). It
    never enters the generator's loss and draws no random numbers, so the generator, D and the weight average are
    those of a run without it, bit for bit. `forward` is what the step calls (the precision's wrap)."""

    def __init__(self, network, optimizer, forward=None):
        self.network, self.optimizer = network, optimizer
        self.forward = network if forward is None else forward
        self.loss = None  # of its last update (the global batch's)


def discriminator_update(D, optimizer, loss_of, real, real_labels, fake, fake_labels) -> float:
    """One optimiser step of D on `loss_of(D(real), D(fake))`; the loss of the global batch."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_of(D(real, real_labels), D(fake, fake_labels))
    loss.backward()
    optimizer.step()
    return global_mean(loss.item())


def nonprivate_discriminator_step(G, D, d_optimizer, real, real_labels, rng, recipe=None, side=None) -> float:
    """One ordinary (non-private) discriminator update on this process's part of a global batch (equal parts
    under torchrun) and as many fresh fakes, with a `utils.gan.recipe.Recipe`'s loss and augmentation when given;
    the loss of the global batch. A `SideDiscriminator` is updated after D on the same views of the same images."""
    z, fake_labels = local_random_inputs(G, len(real) * world_size(), rng, real.device)
    with torch.no_grad():
        fake = G(z, fake_labels)  # generated once: D and the side discriminator see the same (detached) fakes
    loss_of, (real, fake) = (d_loss, (real, fake)) if recipe is None else (recipe.loss.d, recipe.d_views(real, fake))
    loss = discriminator_update(D, d_optimizer, loss_of, real, real_labels, fake, fake_labels)
    if side is not None:
        side.loss = discriminator_update(side.forward, side.optimizer, loss_of, real, real_labels, fake, fake_labels)
    return loss


def nonprivate_generator_step(G, D, g_optimizer, batch_size, rng, device, recipe=None) -> float:
    """One generator update on `batch_size` fakes (the global batch; this process generates its part) against an
    ordinary discriminator (D's parameters get no update); the loss of the global batch."""
    z, labels = local_random_inputs(G, batch_size, rng, device)
    g_optimizer.zero_grad(set_to_none=True)
    fake = G(z, labels)
    loss = g_loss(D(fake, labels)) if recipe is None else recipe.g_loss(D, fake, labels)
    loss.backward()
    g_optimizer.step()
    return global_mean(loss.item())


class NonPrivateStep(TrainingStep):
    """The teacher's step: one discriminator update per batch of `batches` (EpochBatches) and a generator update
    when the recipe says it is due (every batch by default). With a weight average, the checkpoint's "generator"
    is the average (what every later stage samples) and "generator_live" the trained weights. The networks' forward
    passes run in `precision` (utils/run/precision.py: fp32 calls them as they are); the updates stay float32.
    `dp_discriminator` (train_teacher.py --dp-d-channels), with its optimiser `optimizers["dp_d"]`, trains beside D
    as a `SideDiscriminator` and is saved under DP_DISCRIMINATOR."""
    name = "teacher"

    def __init__(self, G, D, optimizers: dict, batches, epochs: int, ledger: dict, seed: int, device,
                 recipe=None, precision=FP32, dp_discriminator=None):
        precision.prepare(G, D)
        self.generator, self.discriminator, self.optimizers = G, D, optimizers
        self.forward_g, self.forward_d = precision.wrap(G), precision.wrap(D)
        self.side = None
        if dp_discriminator is not None:
            precision.prepare(dp_discriminator)
            self.side = SideDiscriminator(dp_discriminator, optimizers["dp_d"], precision.wrap(dp_discriminator))
        self.epoch_batches, self.ledger, self.device, self.recipe = batches, ledger, device, recipe
        self.rng = torch.Generator().manual_seed(seed)
        self.steps_per_epoch = len(batches)
        self.planned_steps = epochs * len(batches)
        self.losses = {}

    def batches(self, start: int, total: int):
        return batches_from(self.epoch_batches, start, total)

    def optimize_parameters(self, batch, step: int) -> dict:
        real, labels = (t.to(self.device) for t in batch)
        G, D, recipe = self.forward_g, self.forward_d, self.recipe
        self.losses["d_loss"] = nonprivate_discriminator_step(G, D, self.optimizers["d"], real, labels, self.rng,
                                                              recipe, self.side)
        if self.side is not None:
            self.losses["dp_d_loss"] = self.side.loss
        if recipe is None or recipe.g_step_due():
            accuracy = None if recipe is None else recipe.before_g_step(G, D, len(real), self.device)
            self.losses["g_loss"] = nonprivate_generator_step(G, D, self.optimizers["g"], len(real) * world_size(),
                                                              self.rng, self.device, recipe)
            if recipe is not None:
                recipe.after_g_step(self.generator, accuracy)
        return dict(self.losses)

    def sampling_generator(self):
        return self.generator if self.recipe is None else self.recipe.sampling_generator(self.generator)

    def log_fields(self) -> dict:
        return {} if self.recipe is None else self.recipe.log_fields()

    def models(self) -> dict:
        live = {"generator_live": self.generator} if self.sampling_generator() is not self.generator else {}
        side = {DP_DISCRIMINATOR: self.side.network} if self.side is not None else {}
        return {"generator": self.sampling_generator(), **live, "discriminator": self.discriminator, **side}

    def rng_states(self) -> dict:
        return {"train": self.rng.get_state()}

    def extra_state(self) -> dict:
        return {} if self.recipe is None else {"recipe": self.recipe.state_dict()}

    def restore(self, checkpoint: dict):
        self.rng.set_state(checkpoint["rng"]["train"])
        if self.recipe is not None and "recipe" in checkpoint:
            self.recipe.load_state_dict(checkpoint["recipe"], checkpoint["generator"])


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
