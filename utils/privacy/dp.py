"""DP-SGD on the discriminator: the one implementation behind `fine_tune.py` and `train_teacher.py --dp`.

Privacy model (docs/DESIGN.md, "Privacy"). Only the discriminator touches the private split, and only through
DP-SGD with Opacus: Poisson sampling with expected batch B (sample rate q = B/N), per-sample clipping to C,
Gaussian noise of standard deviation sigma * C. The generator is post-processing of the discriminator's released
parameters.

- Discriminator step (Opacus's DCGAN example): the real Poisson batch and as many fakes (latent vectors and
  uniform random labels, never the real batch's labels) go through the wrapped discriminator, both losses are
  added and one DP optimizer step follows. The per-sample gradient Opacus clips is that of the pair
  (real i, fake i); the fakes depend only on the generator, so one private record still moves the clipped sum
  by at most C. An empty Poisson batch still takes a noisy step (the accountant counts it).
- Per-pair gradients (`--grad-sample-mode`): by default `fused` (utils/privacy/pair_gradients.py: one forward pass of
  the 2n images and each layer's per-pair gradients as one batched product, about 1.3x a plain step against about
  2x for Opacus's hooks), handed to Opacus's DP optimizer through its no-op wrapper: the clipping, the noise and the
  accountant step are Opacus's in every mode (hooks, functorch, ew, ghost, vmap stay selectable).
- Generator step: the discriminator's per-sample hooks are off, the unwrapped discriminator is called, the loss is
  backpropagated into the generator's parameters only, and no accountant step is taken. The discriminator's
  gradients are cleared at the start of every DP step.
- Fakes reused (`--reuse-fakes`, off by default): one pool of fakes per generator step (`FakePool`), drawn at the
  first D step after it, and each D step pairs its n real examples with the pool's first n. The fakes depend only
  on the generator, which no D step changes, so this is post-processing of the generator as fresh fakes are: each
  D step still clips every (real i, fake i) pair to C and adds the noise once. The pool's size is fixed by (B, q)
  alone (B plus 6 standard deviations of the batch size); a larger batch grows it by whole chunks of fresh fakes.
- Many discriminator steps per generator step (`--d-steps-per-g-step`, Bie, Kamath & Zhang 2023, who use 50-100
  from scratch). Our default of 5 suits the short budget of fine-tuning a pre-trained compact generator, where
  the generator needs to move a little on every pass over the data; raise it for training from scratch.
- Step count: `epochs * int(1/q)` discriminator steps (`--max-steps` stops earlier). With `--target-epsilon` the
  noise multiplier is calibrated for the whole planned run with the ledger's earlier mechanisms as a prefix, so the
  composed total meets the target; `--max-steps` only stops early (epsilon then stays below the target).
- No layer that mixes samples: `PrivateDiscriminator` refuses a discriminator with a minibatch std layer (one
  sample's logit would depend on the others of its group, so clipping "its" gradient would not bound one record's
  influence), and runs Opacus's `ModuleValidator` on every discriminator it is given, with a validator for that
  layer registered here (`register_opacus_validators`).
- Resume-exact: the Poisson sampler and the noise draw from their own `torch.Generator`s, saved in the checkpoint
  with the accountant history (with --reuse-fakes, the pool of fakes of the generator step under way too).
  Batches are drawn from the sampler directly: a DataLoader iterator draws a seed from the loader's generator
  (the sampler's) every time it starts, so a resumed run would drift.
"""
import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass, fields, replace

import torch
from tqdm import tqdm

from models.discriminator import MinibatchStdDev
from utils.data.datasets import SplitDataset
from utils.gan.steps import d_loss, g_loss, local_random_inputs, random_inputs
from utils.privacy.ledger import (ACCOUNTANTS, SECURE_RNG_NOTE, calibrate_noise, check_delta, check_same_partition,
                                  compose_epsilon, epsilon, history, is_private, record_mechanism)
from utils.privacy.pair_gradients import PAIR_GRADIENT_MODES, pair_gradients
from utils.run.cli import UserError, open_unit_float, positive_float, positive_int
from utils.run.distributed import (gather_parts, global_mean, is_writer, local_part, local_poisson_batch,
                                   make_private_data_parallel, unwrap_data_parallel)
from utils.run.lifecycle import TrainConfig
from utils.run.trainer import TrainingStep

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost") + PAIR_GRADIENT_MODES  # the last two: pair_gradients.py
# The fastest mode that clips exactly in benchmarks/bench_dp_step.py (benchmarks/results/dp_step-*.md: about 1.3x a
# plain step, hooks about 2x; Opacus's modes stay selectable).
DEFAULT_GRAD_SAMPLE_MODE = "fused"
DEFAULT_D_STEPS_PER_G_STEP = 5
SAMPLER_SEED_OFFSET, NOISE_SEED_OFFSET = 7919, 104729  # the sampler's and the noise's seeds differ from --seed's
FAKE_POOL_MARGIN = 6  # --reuse-fakes: a pool holds the expected batch plus this many standard deviations of its size


def add_dp_args(parser, default_target_epsilon: float):
    group = parser.add_argument_group("differential privacy (DP-SGD on the discriminator)")
    noise = group.add_mutually_exclusive_group()
    noise.add_argument("--target-epsilon", type=positive_float, default=default_target_epsilon,
                       help="TOTAL epsilon after this stage, earlier stages' mechanisms included: the noise "
                            "multiplier is calibrated to meet it over the planned run")
    noise.add_argument("--noise-multiplier", type=positive_float, default=None,
                       help="use this noise multiplier sigma instead of calibrating one to --target-epsilon")
    group.add_argument("--delta", type=open_unit_float, default=1e-5, help="must be below 1/N of the private split")
    group.add_argument("--max-grad-norm", type=positive_float, default=1.0, help="per-sample clipping norm C")
    group.add_argument("--accountant", choices=ACCOUNTANTS, default="prv",
                       help="Opacus accountant composing every stage's mechanism (prv is tighter, rdp faster)")
    group.add_argument("--d-steps-per-g-step", type=positive_int, default=DEFAULT_D_STEPS_PER_G_STEP,
                       help="discriminator DP steps per generator step (Bie et al. 2023 use 50-100 from scratch)")
    group.add_argument("--grad-sample-mode", choices=GRAD_SAMPLE_MODES, default=DEFAULT_GRAD_SAMPLE_MODE,
                       help="how the per-pair gradients are computed: Opacus's modes, or fused / vmap "
                            "(utils/privacy/pair_gradients.py), all clipped and noised by Opacus's optimizer; timed "
                            "in benchmarks/bench_dp_step.py")
    group.add_argument("--reuse-fakes", action="store_true",
                       help="draw the fakes once per generator step and reuse them in its D steps (each D step pairs "
                            "its n real examples with the pool's first n); the guarantee is unchanged: the fakes "
                            "depend only on the generator")


@dataclass(frozen=True)
class DPConfig:
    """The DP-SGD settings of a stage (the flags of `add_dp_args`), built once: `DPConfig.from_args(args)`."""
    target_epsilon: float = None  # TOTAL epsilon after the stage; ignored when noise_multiplier is given
    noise_multiplier: float = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    d_steps_per_g_step: int = DEFAULT_D_STEPS_PER_G_STEP
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE
    reuse_fakes: bool = False  # one pool of fakes per generator step (FakePool) instead of fresh fakes per D step

    @classmethod
    def from_args(cls, args) -> "DPConfig":
        """From a parsed command line, or a resumed run's saved args (an option newer than the run: its default)."""
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})


# ---------------------------------------------------------------- the plan: sample rate, steps, noise

@dataclass
class DPPlan:
    sample_rate: float
    steps_per_epoch: int
    planned_steps: int  # epochs * steps_per_epoch: what the noise is calibrated for
    noise_multiplier: float
    calibrated: bool

    def as_dict(self) -> dict:
        return dict(vars(self))


def plan_run(config: DPConfig, train: TrainConfig, split, ledger: dict) -> DPPlan:
    """Check delta and the partition, and fix q, the number of steps and sigma: calibrated so that the ledger's
    earlier mechanisms followed by this run's meet the total target."""
    check_delta(config.delta, len(split))
    check_same_partition(ledger, split)
    if train.batch_size >= len(split):
        raise UserError(f"--batch-size {train.batch_size} must be below the private split's size {len(split)}")
    sample_rate = train.batch_size / len(split)
    steps_per_epoch = int(1 / sample_rate)
    planned = max(1, round(train.epochs * steps_per_epoch))
    if config.noise_multiplier is not None:
        return DPPlan(sample_rate, steps_per_epoch, planned, float(config.noise_multiplier), False)
    # after a non-DP read the total is infinite whatever we do: calibrate this stage's own mechanism alone
    prefix = history(ledger) if is_private(ledger) else []
    sigma = calibrate_noise(prefix, config.target_epsilon, config.delta, sample_rate, planned, config.accountant)
    return DPPlan(sample_rate, steps_per_epoch, planned, float(sigma), True)


def plan_for(checkpoint, config: DPConfig, train: TrainConfig, split, ledger: dict) -> DPPlan:
    """The plan of a resumed run (saved in its checkpoint), or a fresh run's `plan_run`: either way checked
    against the private split before anything is written."""
    if checkpoint is None:
        return plan_run(config, train, split, ledger)
    check_same_partition(ledger, split)
    return DPPlan(**checkpoint["dp"]["plan"])


# ---------------------------------------------------------------- the private discriminator

MIXES_SAMPLES = ("a minibatch std layer makes one sample's output depend on the others of its group, so clipping "
                 "per-sample gradients no longer bounds one record's influence: DP-SGD cannot train it")


def minibatch_std_errors(module: MinibatchStdDev) -> list:
    """Opacus's validator of the minibatch std layer (like its BatchNorm one): never trainable with DP-SGD."""
    from opacus.validators.errors import UnsupportableModuleError
    return [UnsupportableModuleError(f"{module}: {MIXES_SAMPLES}")]


def register_opacus_validators():
    """Register `minibatch_std_errors` with Opacus's `ModuleValidator` (idempotent). Called on every DP path
    (`check_private_discriminator`) rather than at import: Opacus takes a second to load, most runs need no DP."""
    from opacus.validators.utils import register_module_validator
    register_module_validator(MinibatchStdDev)(minibatch_std_errors)


def check_private_discriminator(D: torch.nn.Module):
    """Refuse a discriminator that mixes samples (a one-line UserError), then Opacus's own strict validation."""
    from opacus.validators.module_validator import ModuleValidator
    if any(isinstance(module, MinibatchStdDev) for module in D.modules()):
        raise UserError(f"refusing to train this discriminator with DP-SGD: {MIXES_SAMPLES}")
    register_opacus_validators()
    ModuleValidator.validate(D, strict=True)


class PrivateDiscriminator:
    """A discriminator made private by Opacus, with its Poisson sampler over the private split."""

    def __init__(self, D, optimizer, split, batch_size: int, noise_multiplier: float, config: DPConfig,
                 seed: int = 0, device="cpu"):
        from opacus import PrivacyEngine
        from opacus.data_loader import DPDataLoader
        check_private_discriminator(D)  # before Opacus wraps it (and before any state is built)
        grad_sample_mode = config.grad_sample_mode
        self.split, self.device, self.grad_sample_mode = split, torch.device(device), grad_sample_mode
        # fused, vmap: per-pair gradients computed here, handed to Opacus's optimizer through its no-op wrapper
        self.pair_gradients = pair_gradients(grad_sample_mode, D) if grad_sample_mode in PAIR_GRADIENT_MODES else None
        self.sample_rate = batch_size / len(split)
        self.sample_rng = torch.Generator().manual_seed(seed + SAMPLER_SEED_OFFSET)
        self.noise_rng = torch.Generator(device=self.device).manual_seed(seed + NOISE_SEED_OFFSET)
        loader = DPDataLoader(SplitDataset(split), sample_rate=self.sample_rate, generator=self.sample_rng)
        with warnings.catch_warnings():  # "Secure RNG turned off": stated in the model card (SECURE_RNG_NOTE)
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            self.engine = PrivacyEngine(accountant=config.accountant)
        wrapped = make_private_data_parallel(  # under torchrun: noise from rank 0 only, once per step
            self.engine, D, optimizer, loader, batch_size, noise_multiplier=noise_multiplier,
            max_grad_norm=config.max_grad_norm, poisson_sampling=False,  # the loader above already samples, seeded
            noise_generator=self.noise_rng, grad_sample_mode="no_op" if self.pair_gradients else grad_sample_mode,
            criterion=torch.nn.BCEWithLogitsLoss())
        if grad_sample_mode == "ghost":
            self.module, self.optimizer, self.criterion, self.loader = wrapped
        else:
            (self.module, self.optimizer, self.loader), self.criterion = wrapped, None
        self.module.forbid_grad_accumulation()
        # make_private derives q from len(loader) = int(1/q); the accountant gets the exact q = B/N
        self.optimizer.attach_step_hook(self.engine.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        self._indices = None

    @property
    def plain(self) -> torch.nn.Module:
        """The discriminator itself, without Opacus's wrappers (its hooks still need `hooks_off`)."""
        return unwrap_data_parallel(self.module._module)

    @property
    def history(self) -> list:
        return [tuple(entry) for entry in self.engine.accountant.history]

    @property
    def steps(self) -> int:
        return sum(entry[2] for entry in self.engine.accountant.history)

    def next_local_batch(self):
        """(images, labels, global size): this process's part of the next Poisson batch over the whole split, on
        the device (possibly empty), and the size of the whole batch (every rank draws the same one)."""
        if self._indices is None:
            self._indices = iter(self.loader.batch_sampler)
        try:
            indices = next(self._indices)
        except StopIteration:  # one "epoch" of int(1/q) draws is over; the draws themselves are i.i.d.
            self._indices = iter(self.loader.batch_sampler)
            indices = next(self._indices)
        mine, n_global = local_poisson_batch(indices)
        images, labels = self.split.batch(torch.as_tensor(mine, dtype=torch.long))
        return images.to(self.device), labels.to(self.device), n_global

    def next_batch(self):
        """The next Poisson batch (images, labels) on the device, possibly empty (a single process)."""
        return self.next_local_batch()[:2]

    def rng_states(self) -> dict:
        return {"sample": self.sample_rng.get_state(), "noise": self.noise_rng.get_state()}

    def restore(self, accountant_history, rng_states: dict):
        """Continue where a checkpoint stopped: the accountant's history (epsilon never restarts at 0), the
        sampler's and the noise's generators."""
        self.engine.accountant.history = [tuple(entry) for entry in accountant_history]
        self.sample_rng.set_state(rng_states["sample"])
        self.noise_rng.set_state(rng_states["noise"])

    def loss(self, real_logits, fake_logits):
        if self.criterion is None:
            return d_loss(real_logits, fake_logits)
        # ghost clipping needs its per-sample loss wrapper; BCE-with-logits to 1/0 is the same softplus loss
        return (self.criterion(real_logits, torch.ones_like(real_logits))
                + self.criterion(fake_logits, torch.zeros_like(fake_logits)))

    def empty_step(self):
        """A DP step on an empty Poisson batch: zero clipped sum, noise added, one accountant step."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad_sample = p.new_zeros((0, *p.shape))
            p.grad = torch.zeros_like(p)
        self.optimizer.step()


@contextlib.contextmanager
def hooks_off(module):
    """Opacus's per-sample hooks off (as many modes as have them), back on afterwards."""
    has_hooks = hasattr(module, "disable_hooks")
    if has_hooks:
        module.disable_hooks()
    try:
        yield
    finally:
        if has_hooks:
            module.enable_hooks()


# ---------------------------------------------------------------- fakes reused across a generator step

def fake_pool_size(expected_batch: int, sample_rate: float) -> int:
    """Fakes in one pool (--reuse-fakes): the expected Poisson batch B plus FAKE_POOL_MARGIN standard deviations of
    its size (Binomial(N, q): sqrt(B (1 - q))), so that a larger batch comes about once in 10^9 D steps. A function
    of (B, q) alone, never of a realised batch."""
    return math.ceil(expected_batch + FAKE_POOL_MARGIN * math.sqrt(expected_batch * (1 - sample_rate)))


class FakePool:
    """The fakes of one generator step's D steps (--reuse-fakes).

    Drawn from the generator at the first D step after a generator step (empty Poisson batch or not, so when and how
    many fakes are drawn never depends on the private data), from the training generator `rng`; a D step on a
    batch of n takes the pool's first n (fake i goes with real i, clipped together), and `refresh`, after every
    generator step, drops them. A batch larger than the pool grows it by whole chunks of `size` fresh fakes of the
    same generator, kept until the refresh, so every real example still has a fake of its own. Under torchrun
    every rank generates its part of a chunk (the generator's BatchNorm takes the whole chunk's statistics, as in
    one process) and the parts are gathered: every rank holds the whole pool, as one process would, and takes its
    part of the first n. Saved in the checkpoint (`state_dict`): drawing it again on resume would move the
    generator's BatchNorm running statistics a second time."""

    def __init__(self, size: int):
        self.size = size
        self.fakes = self.labels = None

    def refresh(self):
        """The generator has changed: the next D step draws a new pool."""
        self.fakes = self.labels = None

    def take(self, G, n_global: int, rng, device) -> tuple:
        """(fakes, labels): this process's part of the pool's first `n_global`, the pool drawn or grown first."""
        while self.fakes is None or len(self.fakes) < n_global:
            self._grow(G, rng, device)
        return local_part(self.fakes[:n_global]), local_part(self.labels[:n_global])

    def _grow(self, G, rng, device):
        z, labels = random_inputs(G, self.size, rng, "cpu")  # every rank draws the whole chunk's inputs
        with torch.no_grad():
            fakes = gather_parts(G(local_part(z).to(device), local_part(labels).to(device)), self.size)
        labels = labels.to(device)
        self.fakes = fakes if self.fakes is None else torch.cat([self.fakes, fakes])
        self.labels = labels if self.labels is None else torch.cat([self.labels, labels])

    def state_dict(self):
        return None if self.fakes is None else {"fakes": self.fakes.cpu(), "labels": self.labels.cpu()}

    def load_state_dict(self, state, device):
        self.refresh()
        if state is not None:
            self.fakes, self.labels = state["fakes"].to(device), state["labels"].to(device)


# ---------------------------------------------------------------- the two steps

def discriminator_backward(pd: PrivateDiscriminator, real, real_labels, fake, fake_labels):
    """Clear D's gradients, then real and fake through the wrapped D, one loss, one backward (fused, vmap: their
    per-pair gradients, utils/privacy/pair_gradients.py).

    With Opacus's hooks (hooks, functorch) the per-sample gradients come from the hooks and the DP optimizer
    overwrites D's ordinary `.grad`, so the backward targets the images instead: autograd then skips D's weight
    gradients (about a fifth of the step), and the hooks still see every layer's output gradient.
    """
    pd.optimizer.zero_grad(set_to_none=True)
    if pd.pair_gradients is not None:  # fused, vmap: the per-pair gradients Opacus's optimizer clips
        loss, grads = pd.pair_gradients(pd.plain, real, real_labels, fake, fake_labels)
        for p in pd.optimizer.params:
            p.grad_sample = grads[p]
        return loss
    targets = None
    if pd.grad_sample_mode in ("hooks", "functorch"):
        real, fake = real.detach().requires_grad_(), fake.detach().requires_grad_()
        targets = [real, fake]
    loss = pd.loss(pd.module(real, real_labels), pd.module(fake, fake_labels))
    with warnings.catch_warnings():  # ew, ghost: the images need no gradient, harmless, said at every step
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward() if targets is None else loss.backward(inputs=targets)
    return loss


def dp_discriminator_step(pd: PrivateDiscriminator, G, real, real_labels, rng, n_global: int = None,
                          pool: FakePool = None):
    """One DP-SGD step of D on (this process's part of) a Poisson batch of `n_global` examples and as many fresh
    fakes, or with a `pool` (--reuse-fakes) the pool's first `n_global`; the loss of the global batch, or None for
    an empty one. Under torchrun every rank generates its part of the fakes even when its part of the real batch is
    empty: G's BatchNorm statistics are the global batch's."""
    n_global = len(real) if n_global is None else n_global
    if pool is not None:  # drawn even before an empty batch: the pool's draws never depend on the private data
        fake, fake_labels = pool.take(G, n_global, rng, real.device)
    if n_global == 0:
        pd.empty_step()
        return None
    if pool is None:
        z, fake_labels = local_random_inputs(G, n_global, rng, real.device)
        with torch.no_grad():
            fake = G(z, fake_labels)
    if len(real) == 0:
        pd.empty_step()  # this rank adds nothing to the clipped sum, but joins the step's all-reduce
        return global_mean(0.0, weight=0)
    loss = discriminator_backward(pd, real, real_labels, fake, fake_labels)
    pd.optimizer.step()
    return global_mean(loss.item(), weight=len(real))


def dp_generator_step(pd: PrivateDiscriminator, G, g_optimizer, batch_size: int, rng, device) -> float:
    """The DP loop's generator update against the current private D: hooks off, gradients into G only, no
    accountant step (the generator never reads private data: post-processing)."""
    z, labels = local_random_inputs(G, batch_size, rng, device)
    g_optimizer.zero_grad(set_to_none=True)
    with hooks_off(pd.module):
        loss = g_loss(pd.plain(G(z, labels), labels))
        loss.backward(inputs=[p for p in G.parameters() if p.requires_grad])
    g_optimizer.step()
    return global_mean(loss.item())


# ---------------------------------------------------------------- the step of the training loop

def epsilon_fields(ledger: dict, plan: DPPlan, steps: int, delta: float, accountant: str) -> dict:
    """Total epsilon (None when infinite: a non-DP read) and this stage's own, for metrics and reports."""
    own_history = [(plan.noise_multiplier, plan.sample_rate, steps)] if steps else []
    own = compose_epsilon(own_history, delta, accountant)
    total = own if is_private(ledger) and history(ledger) == own_history else epsilon(ledger, delta, accountant)
    return {"epsilon": total if math.isfinite(total) else None, "epsilon_stage": own}


class DPStep(TrainingStep):
    """The DP loop's step for `utils.run.trainer.Trainer`: D by DP-SGD on the private split (one Poisson batch a
    step), G every `d_steps_per_g_step` D steps. The ledger is updated in place (this run's mechanism, steps so
    far); the stage's name and the run's are the mechanism's label. `broken_clipping_norm` (audit controls only,
    fine_tune.py --audit-control no-clip) clips at that norm but keeps the noise of `config.max_grad_norm`, while
    the ledger records `config.max_grad_norm`: a simulated implementation bug for the audit to find. With
    `config.reuse_fakes` the D steps of a generator step take their fakes from one `FakePool`, dropped after every
    generator step and saved in the checkpoint."""
    EPS_REFRESH_SECONDS = 2.0  # the progress bar's epsilon: recomputed at most this often, and only once...
    EPS_SHARE = 0.05  # ...the time since the last one is 1/EPS_SHARE times what it cost (PRV: up to 1.5 s an epsilon)

    def __init__(self, G, D, optimizers: dict, split, ledger: dict, plan: DPPlan, config: DPConfig,
                 train: TrainConfig, run, broken_clipping_norm: float = None, recipe=None):
        self.name, self.run_name = run.stage, os.path.basename(run.run_dir)
        self.generator, self.ledger, self.plan, self.config, self.train = G, ledger, plan, config, train
        self.device = next(G.parameters()).device
        noise, engine = plan.noise_multiplier, config
        if broken_clipping_norm is not None:  # an audit control: the noise of norm C, clipping that never binds
            noise = noise * config.max_grad_norm / broken_clipping_norm
            engine = replace(config, max_grad_norm=broken_clipping_norm)
        self.pd = PrivateDiscriminator(D, optimizers["d"], split, train.batch_size, noise, engine, train.seed,
                                       self.device)
        self.optimizers = {"g": optimizers["g"], "d": self.pd.optimizer}
        self.steps_per_epoch, self.planned_steps = plan.steps_per_epoch, plan.planned_steps
        self.rng = torch.Generator().manual_seed(train.seed)
        # --reuse-fakes: one pool of fakes per generator step; None: fresh fakes every D step (the default)
        self.pool = FakePool(fake_pool_size(train.batch_size, plan.sample_rate)) if config.reuse_fakes else None
        self.losses, self.eps, self.eps_steps, self.eps_refreshed, self.eps_cost = {}, {}, None, -math.inf, 0.0
        self.recipe = recipe  # weight average and adaptive D steps (utils/gan/recipe.py); None: every d-th step

    def sampling_generator(self):
        return self.generator if self.recipe is None else self.recipe.sampling_generator(self.generator)

    def log_fields(self) -> dict:
        return {} if self.recipe is None else self.recipe.log_fields()

    def models(self) -> dict:
        live = {"generator_live": self.generator} if self.sampling_generator() is not self.generator else {}
        return {"generator": self.sampling_generator(), **live, "discriminator": self.pd.plain}

    def restore(self, checkpoint: dict):
        self.pd.restore(checkpoint["dp"]["history"], checkpoint["rng"])
        self.rng.set_state(checkpoint["rng"]["train"])
        self.losses = dict(checkpoint["dp"].get("losses", {}))
        if self.pool is not None:  # the pool of the generator step the run stopped in (None: drawn at the next step)
            self.pool.load_state_dict(checkpoint["dp"].get("fake_pool"), self.device)
        if self.recipe is not None and "recipe" in checkpoint:
            self.recipe.load_state_dict(checkpoint["recipe"], checkpoint["generator"])

    def record(self):
        """This run's mechanism in the ledger, with the steps taken so far (from the accountant's history)."""
        c = self.config
        record_mechanism(self.ledger, self.name, self.plan.noise_multiplier, self.plan.sample_rate, self.pd.steps,
                         c.max_grad_norm, c.accountant, run=self.run_name)

    def epsilon(self) -> dict:
        start = time.monotonic()
        self.record()
        self.eps = epsilon_fields(self.ledger, self.plan, self.pd.steps, self.config.delta, self.config.accountant)
        self.eps_steps, self.eps_refreshed = self.pd.steps, time.monotonic()
        self.eps_cost = self.eps_refreshed - start
        return self.eps

    def begin(self, step: int) -> dict:
        if is_writer():
            tqdm.write(describe_plan(self.plan, self.config, self.train.batch_size, len(self.pd.split), self.ledger))
        self.epsilon()
        return {}

    def batches(self, start: int, total: int):
        for _ in range(start, total):
            yield self.pd.next_local_batch()

    def optimize_parameters(self, batch, step: int) -> dict:
        real, labels, n_global = batch
        d_value = dp_discriminator_step(self.pd, self.generator, real, labels, self.rng, n_global, self.pool)
        if d_value is not None:  # an empty Poisson batch has no loss: the last one stands
            self.losses["d_loss"] = d_value
        if self.recipe is None and step % self.config.d_steps_per_g_step == 0:
            self.generator_step()
        elif self.recipe is not None and self.recipe.g_step_due():
            with hooks_off(self.pd.module):  # D's accuracy on fakes reads no private data: no accountant step
                accuracy = self.recipe.before_g_step(self.generator, self.pd.plain, self.train.batch_size,
                                                     self.device)
            self.generator_step()
            self.recipe.after_g_step(self.generator, accuracy)
        return dict(self.losses)

    def generator_step(self):
        self.losses["g_loss"] = dp_generator_step(self.pd, self.generator, self.optimizers["g"],
                                                  self.train.batch_size, self.rng, self.device)
        if self.pool is not None:  # the generator changed: its old fakes go
            self.pool.refresh()

    def milestone(self, step: int, boundary: bool) -> dict:
        return self.epsilon() if boundary else {}

    def postfix(self) -> dict:
        """Epsilon so far for the progress bar (display only: the metrics record it at epoch ends, and a stage
        shorter than an epoch would otherwise show 0 until its last step), refreshed every EPS_REFRESH_SECONDS but
        so that the accountant takes at most about EPS_SHARE of the time: refreshed every 2 s, PRV's 0.1-1.5 s an
        epsilon took about 1.4 s of each 3.07 s step of the seed's 20-epoch DP stage (docs/RESULTS.md, "make
        reproduce, measured")."""
        wait = max(self.EPS_REFRESH_SECONDS, self.eps_cost / self.EPS_SHARE)
        if self.pd.steps != self.eps_steps and time.monotonic() - self.eps_refreshed >= wait:
            self.epsilon()
        total = "inf" if self.eps.get("epsilon") is None else f"{self.eps['epsilon']:.3f}"
        return {"eps": total, "eps_stage": f"{self.eps.get('epsilon_stage', 0.0):.3f}"}

    def rng_states(self) -> dict:
        return {"train": self.rng.get_state(), **self.pd.rng_states()}

    def extra_state(self) -> dict:
        self.record()
        recipe = {} if self.recipe is None else {"recipe": self.recipe.state_dict()}
        pool = {} if self.pool is None else {"fake_pool": self.pool.state_dict()}
        return {"dp": {"history": self.pd.history, "plan": self.plan.as_dict(), "losses": dict(self.losses), **pool},
                **recipe}


def describe_plan(plan: DPPlan, config: DPConfig, batch_size: int, private_size: int, ledger: dict) -> str:
    """One paragraph for the log: the mechanism, how sigma was chosen, and the noise generator."""
    p, c = plan, config
    how = f"calibrated to a total epsilon of {c.target_epsilon}" if p.calibrated else "given"
    reuse = (f" Fakes: one pool of {fake_pool_size(batch_size, p.sample_rate)} per G step, reused by its D steps."
             if c.reuse_fakes else "")
    if p.calibrated and not is_private(ledger):
        how = f"calibrated to epsilon {c.target_epsilon} for this stage alone (the total is infinite)"
    return (f"DP-SGD on the discriminator: sigma = {p.noise_multiplier:.4f} ({how}), q = {p.sample_rate:.5f} "
            f"(expected batch {batch_size} of {private_size}), C = {c.max_grad_norm}, "
            f"{p.planned_steps} planned D steps ({p.steps_per_epoch}/epoch), {c.d_steps_per_g_step} D steps per "
            f"G step, delta = {c.delta:g}, {c.accountant.upper()} accountant, {c.grad_sample_mode} per-sample "
            f"gradients.{reuse} {SECURE_RNG_NOTE}")
