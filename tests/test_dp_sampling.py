"""The Poisson batches a DP step trains on are drawn at the q the ledger records (issue 25, item 4).

A sampler drawing at another rate than the accountant is told breaks the guarantee without failing any other test.
Here thousands of batches come from the training loop's own path (`DPStep.batches` ->
`PrivateDiscriminator.next_local_batch`, built by the real `plan_run`), and their sizes must be Binomial(N, q) with
the q of the ledger's mechanism (mean and standard deviation within 5 standard errors: seconds, not flaky, and a
doubled rate fails by tens of standard errors), every record must go in at rate q, and the q of the accountant's
history must be the ledger's. Under torchrun (the ranks' parts together): tests/test_distributed.py.
"""
import os

import pytest
import torch

from conftest import TINY_PUBLIC, check_inclusion_counts, check_poisson_batch_sizes
from models import Discriminator, Generator
from utils.data.datasets import load_split
from utils.privacy import dp
from utils.privacy.ledger import new_ledger
from utils.run.lifecycle import Run, TrainConfig

EXPECTED_BATCH = 32  # q = 32/400 = 0.08 on the tiny private split
DRAWS = 3000


def dp_training_step(data_root, config: dp.DPConfig = None, batch_size=EXPECTED_BATCH, seed=0):
    """The DP stage's step as fine_tune.py builds it: the plan from `plan_run` (sigma given), a fresh ledger."""
    split = load_split("fashion-mnist", "private", data_root, TINY_PUBLIC)
    config = config or dp.DPConfig(noise_multiplier=1.0, accountant="rdp")
    train = TrainConfig(batch_size=batch_size, epochs=1, seed=seed)
    ledger = new_ledger(split.partition)
    plan = dp.plan_run(config, train, split, ledger)
    torch.manual_seed(0)
    G, D = Generator(channels=(12, 8, 4), bits=8), Discriminator(channels=(8, 8))
    optimizers = {"g": torch.optim.Adam(G.parameters()), "d": torch.optim.Adam(D.parameters())}
    run = Run(os.path.join("never-written", "00000-test"), "private")  # names the mechanism; nothing is saved
    return dp.DPStep(G, D, optimizers, split, ledger, plan, config, train, run), split


def test_poisson_batches_of_a_dp_step_are_drawn_at_the_ledgers_q(tiny_data_root, monkeypatch):
    step, split = dp_training_step(tiny_data_root)
    drawn = []  # the indices next_local_batch reads, seen where it hands them to the split

    def spy(indices):
        drawn.append(list(indices))
        return local_poisson_batch(indices)
    local_poisson_batch = dp.local_poisson_batch
    monkeypatch.setattr(dp, "local_poisson_batch", spy)
    sizes = []
    for images, labels, n_global in step.batches(0, DRAWS):
        assert len(images) == len(labels) == n_global == len(drawn[-1])  # one process: the whole batch
        assert len(set(drawn[-1])) == n_global  # no record twice in a batch
        sizes.append(n_global)
    step.pd.empty_step()  # one DP step: the accountant's history gets its q
    step.record()
    (mechanism,) = step.ledger["mechanisms"]
    q = mechanism["sample_rate"]
    assert q == step.plan.sample_rate == EXPECTED_BATCH / len(split)
    assert step.pd.history == [(1.0, q, 1)]  # the accountant composes the ledger's q, not Opacus's 1/len(loader)
    check_poisson_batch_sizes(sizes, len(split), q)
    counts = torch.bincount(torch.tensor([i for batch in drawn for i in batch]), minlength=len(split))
    assert len(counts) == len(split)  # no index outside the split
    check_inclusion_counts(counts, DRAWS, q)


def test_the_check_fails_on_a_doubled_rate():
    """The statistics themselves: Binomial(400, 0.16) sizes pass against q = 0.16 and fail against 0.08."""
    torch.manual_seed(0)
    sizes = torch.distributions.Binomial(400, torch.tensor(0.16)).sample((DRAWS,))
    check_poisson_batch_sizes(sizes, 400, 0.16)
    with pytest.raises(AssertionError, match="mean batch"):
        check_poisson_batch_sizes(sizes, 400, 0.08)
