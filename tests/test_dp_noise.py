"""DP-SGD really happens (utils/privacy/dp.py on real Opacus): every --grad-sample-mode clips each (real i, fake i) pair
to C exactly, Gaussian noise of standard deviation sigma*C/B is really added to the applied update, it comes from the
run's own seeded noise generator, and the sigma the ledger records is the sigma that is used.

Each test drives the discriminator the training loop builds (DPStep -> PrivateDiscriminator) through one
optimizer step on a fixed batch, with plain SGD at learning rate 1 so that the applied update is the DP gradient.
"""
import math
import os

import pytest
import torch

from conftest import TINY_PUBLIC
from models import Discriminator, Generator
from utils.data.datasets import load_split
from utils.privacy import dp
from utils.privacy.ledger import new_ledger
from utils.run.lifecycle import Run, TrainConfig

BATCH = 4  # expected batch B; the fixed batch has exactly B pairs
CLIP = 0.05  # C: small enough that every pair's gradient is clipped


def dp_settings(seed=0, grad_sample_mode=dp.DEFAULT_GRAD_SAMPLE_MODE) -> tuple:
    """(DP config, training config) of the tests' private discriminator."""
    return (dp.DPConfig(delta=1e-5, max_grad_norm=CLIP, accountant="rdp", d_steps_per_g_step=5,
                        grad_sample_mode=grad_sample_mode),
            TrainConfig(batch_size=BATCH, epochs=1, seed=seed, log_every=1, checkpoint_every=100))


def build_trainer(data_root, sigma, seed=0, grad_sample_mode=dp.DEFAULT_GRAD_SAMPLE_MODE):
    """(trainer, G, D, split): the training loop's private discriminator, with sigma fixed by its plan."""
    split = load_split("fashion-mnist", "private", data_root, TINY_PUBLIC)
    torch.manual_seed(0)  # the same initial weights (and global RNG state) whatever the seeds under test
    G, D = Generator(channels=(12, 8, 4), bits=8), Discriminator(channels=(8, 8))
    plan = dp.DPPlan(sample_rate=BATCH / len(split), steps_per_epoch=len(split) // BATCH, planned_steps=10,
                     noise_multiplier=sigma, calibrated=False)
    optimizers = {"g": torch.optim.SGD(G.parameters(), lr=1.0), "d": torch.optim.SGD(D.parameters(), lr=1.0)}
    run = Run(os.path.join("never-written", "00000-test"), "private")  # names the mechanism; nothing is saved
    trainer = dp.DPStep(G, D, optimizers, split, new_ledger(split.partition), plan, *dp_settings(seed, grad_sample_mode),
                        run)
    return trainer, G, D, split


def fixed_batch(G, split):
    real, labels = split.batch(torch.arange(BATCH))
    z, fake_labels = G.sample_inputs(BATCH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fake = G(z, fake_labels)
    return real, labels, fake, fake_labels


def clipped_mean(D, real, labels, fake, fake_labels) -> torch.Tensor:
    """By hand: each pair's gradient of softplus(-D(real i)) + softplus(D(fake i)), clipped to C, summed, / B."""
    reference = Discriminator(channels=(8, 8))
    reference.load_state_dict(D.state_dict())
    total = torch.zeros(sum(p.numel() for p in reference.parameters()))
    for i in range(BATCH):
        loss = (torch.nn.functional.softplus(-reference(real[i:i + 1], labels[i:i + 1]))
                + torch.nn.functional.softplus(reference(fake[i:i + 1], fake_labels[i:i + 1]))).sum()
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(reference.parameters()))])
        total += grad * min(1.0, CLIP / (grad.norm().item() + 1e-6))
    return total / BATCH


def applied_update(trainer, D, batch) -> torch.Tensor:
    """The change one DP optimizer step makes to D's parameters (SGD, lr 1: minus the DP gradient)."""
    before = torch.cat([p.detach().flatten().clone() for p in D.parameters()])
    dp.discriminator_backward(trainer.pd, *batch)
    trainer.pd.optimizer.step()
    return before - torch.cat([p.detach().flatten() for p in D.parameters()])


def noise_of_one_step(data_root, sigma, seed=0):
    """(applied update minus the clipped mean, the trainer): the noise the DP step actually added."""
    trainer, G, D, split = build_trainer(data_root, sigma, seed)
    batch = fixed_batch(G, split)
    expected = clipped_mean(D, *batch)
    return applied_update(trainer, D, batch) - expected, trainer


@pytest.mark.parametrize("mode", dp.GRAD_SAMPLE_MODES)
def test_every_grad_sample_mode_clips_each_pair_exactly(tiny_data_root, mode):
    """sigma = 0: the applied update is each pair's gradient clipped to C, summed, / B (ghost included: it
    clips only through Opacus's per-sample loss wrapper)."""
    trainer, G, D, split = build_trainer(tiny_data_root, 0.0, grad_sample_mode=mode)
    batch = fixed_batch(G, split)
    expected = clipped_mean(D, *batch)
    update = applied_update(trainer, D, batch)
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-7)
    assert expected.norm() <= CLIP + 1e-6  # clipping bit: the mean of B vectors of norm <= C
    assert trainer.pd.history == [(0.0, BATCH / len(split), 1)]


def test_noise_of_std_sigma_c_over_b_is_added(tiny_data_root):
    """The applied update minus the clipped mean has std sigma*C/B over the parameters (2841 of them: the
    estimate is within a few percent); sigma = 0 adds nothing."""
    sigma = 0.8
    noise, _ = noise_of_one_step(tiny_data_root, sigma)
    assert noise.std().item() == pytest.approx(sigma * CLIP / BATCH, rel=0.1)
    assert abs(noise.mean().item()) < 4 * sigma * CLIP / BATCH / noise.numel() ** 0.5
    silent, _ = noise_of_one_step(tiny_data_root, 0.0)
    assert silent.abs().max().item() < 1e-6


def test_noise_comes_from_the_runs_seeded_generator(tiny_data_root):
    """The same --seed draws the same noise, another --seed other noise (global RNG state held equal)."""
    first, _ = noise_of_one_step(tiny_data_root, 1.0, seed=0)
    again, _ = noise_of_one_step(tiny_data_root, 1.0, seed=0)
    other, _ = noise_of_one_step(tiny_data_root, 1.0, seed=1)
    torch.testing.assert_close(first, again, rtol=0, atol=1e-9)
    assert (first - other).abs().max().item() > CLIP / BATCH  # a different draw, not a rounding difference


def test_the_ledgers_sigma_is_the_sigma_used(tiny_data_root):
    """The noise multiplier the ledger (and so the epsilon) is computed from is the one whose noise is added."""
    noise, trainer = noise_of_one_step(tiny_data_root, 0.6)
    trainer.extra_state()  # what a checkpoint saves: the ledger brought up to date
    (mechanism,) = trainer.ledger["mechanisms"]
    assert mechanism["steps"] == 1 and mechanism["max_grad_norm"] == CLIP
    recorded = mechanism["noise_multiplier"]
    assert recorded == 0.6
    assert noise.std().item() == pytest.approx(recorded * CLIP / BATCH, rel=0.1)


def test_the_progress_bars_epsilon_moves_before_the_first_epoch_ends(tiny_data_root, monkeypatch):
    """A DP stage shorter than an epoch (make pipeline's 0.25 epochs) has no epoch boundary before its last step:
    the bar's epsilon is the accountant's for the steps taken so far, not the 0 recorded at the start."""
    trainer, _, _, _ = build_trainer(tiny_data_root, 1.0)
    monkeypatch.setattr(trainer, "EPS_REFRESH_SECONDS", 0.0)
    monkeypatch.setattr(trainer, "EPS_SHARE", math.inf)  # whatever the accountant costs
    trainer.begin(0)
    assert float(trainer.postfix()["eps"]) == 0.0
    for step, batch in enumerate(trainer.batches(0, 3), start=1):
        trainer.optimize_parameters(batch, step)
    shown = float(trainer.postfix()["eps"])
    assert trainer.pd.steps == 3 and shown > 0.0
    assert shown == pytest.approx(trainer.epsilon()["epsilon"], abs=5e-4)


def test_the_progress_bars_epsilon_takes_a_small_share_of_the_time(tiny_data_root, monkeypatch):
    """PRV takes 0.1-1.5 s an epsilon: refreshed every 2 s regardless, the bar's epsilon took about 1.4 s of each
    3.07 s step of a 20-epoch DP stage. It is recomputed only once the time since the last one is 1/EPS_SHARE times
    what that one cost."""
    trainer, _, _, _ = build_trainer(tiny_data_root, 1.0)
    clock = [0.0]
    monkeypatch.setattr(dp.time, "monotonic", lambda: clock[0])
    fields = dp.epsilon_fields

    def one_second(*args):  # an accountant that takes 1 s of the clock
        clock[0] += 1.0
        return fields(*args)

    monkeypatch.setattr(dp, "epsilon_fields", one_second)
    trainer.begin(0)
    for step, batch in enumerate(trainer.batches(0, 3), start=1):
        trainer.optimize_parameters(batch, step)
    wait = 1.0 / trainer.EPS_SHARE
    assert wait > trainer.EPS_REFRESH_SECONDS
    clock[0] += wait - 1.0  # past the refresh interval, short of 1/EPS_SHARE times the cost
    assert float(trainer.postfix()["eps"]) == 0.0
    clock[0] += 1.5
    assert float(trainer.postfix()["eps"]) > 0.0
