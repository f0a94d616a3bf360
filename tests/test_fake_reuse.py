"""--reuse-fakes (utils/privacy/dp.py's FakePool; issue 25, item 1): one pool of fakes per generator step, reused by
its D steps, with the guarantee of fresh fakes.

With the option on, every --grad-sample-mode clips each (real i, pool fake i) pair to C exactly and adds noise of
std sigma*C/B once (the pattern of tests/test_dp_noise.py), also when a batch is larger than the pool; the D steps of
one generator step use the same fakes, drawn from the current generator, and a generator step replaces them; a
resumed run equals an uninterrupted one (the pool is saved in the checkpoint); with the option off the runs are the
code's before the option, bit for bit. Under torchrun: tests/test_distributed.py (the pool of 2 ranks is the pool of
one process).
"""
import copy
from dataclasses import replace

import pytest
import torch

import fine_tune
import train_teacher
from conftest import skip_unless_recorded_on, state_hash, teacher_argv
from models import Generator
from test_dp_noise import BATCH, CLIP, build_trainer, clipped_mean
from test_fine_tune import ft_argv, public_ledger, write_compact
from utils.gan.recipe import Recipe, RecipeConfig
from utils.gan.steps import random_inputs
from utils.privacy import dp
from utils.run.checkpoint import load_checkpoint

OVERFLOWING_POOL = 3  # below the batch of BATCH = 4 pairs: the pool grows by whole chunks


def reusing_trainer(data_root, sigma, mode=dp.DEFAULT_GRAD_SAMPLE_MODE, pool_size=None, recipe_d_steps=None):
    """tests/test_dp_noise.py's trainer with --reuse-fakes (its pool of `pool_size` fakes when given), and with
    a recipe of `recipe_d_steps` D steps per G step, as the scripts build it, when given."""
    trainer, G, D, split = build_trainer(data_root, sigma, grad_sample_mode=mode)
    trainer.config = replace(trainer.config, reuse_fakes=True)
    trainer.pool = dp.FakePool(pool_size or dp.fake_pool_size(BATCH, trainer.plan.sample_rate))
    if recipe_d_steps is not None:
        trainer.recipe = Recipe(RecipeConfig(d_steps=recipe_d_steps), G, 0)
    return trainer, G, D, split


def pooled_step(trainer, G, D, split) -> tuple:
    """One DP step with the pool on the first BATCH real examples: (applied update, hand-clipped mean of each
    (real i, pool fake i) pair). The pool is drawn first, as the step would draw it, so the expected mean can be
    computed from D's weights before the step."""
    real, labels = split.batch(torch.arange(BATCH))
    fake, fake_labels = trainer.pool.take(G, BATCH, trainer.rng, "cpu")
    assert len(fake) == BATCH and len(trainer.pool.fakes) >= BATCH
    expected = clipped_mean(D, real, labels, fake, fake_labels)
    before = torch.cat([p.detach().flatten().clone() for p in D.parameters()])
    dp.dp_discriminator_step(trainer.pd, G, real, labels, trainer.rng, BATCH, trainer.pool)
    return before - torch.cat([p.detach().flatten() for p in D.parameters()]), expected


@pytest.mark.parametrize("pool_size", [None, OVERFLOWING_POOL], ids=["pool", "batch-larger-than-pool"])
@pytest.mark.parametrize("mode", dp.GRAD_SAMPLE_MODES)
def test_reused_fakes_every_mode_clips_each_pair_exactly(tiny_data_root, mode, pool_size):
    """sigma = 0: the applied update is each (real i, pool fake i) pair's gradient clipped to C, summed, / B."""
    trainer, G, D, split = reusing_trainer(tiny_data_root, 0.0, mode, pool_size)
    update, expected = pooled_step(trainer, G, D, split)
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-7)
    assert expected.norm() <= CLIP + 1e-6
    assert trainer.pd.history == [(0.0, BATCH / len(split), 1)]
    if pool_size == OVERFLOWING_POOL:  # grown by whole chunks of fresh fakes: every real example has its own
        assert len(trainer.pool.fakes) == 2 * OVERFLOWING_POOL
        assert len({tuple(f.flatten().tolist()) for f in trainer.pool.fakes[:BATCH]}) == BATCH


def test_reused_fakes_get_noise_of_std_sigma_c_over_b(tiny_data_root):
    sigma = 0.8
    trainer, G, D, split = reusing_trainer(tiny_data_root, sigma)
    update, expected = pooled_step(trainer, G, D, split)
    noise = update - expected
    assert noise.std().item() == pytest.approx(sigma * CLIP / BATCH, rel=0.1)
    assert abs(noise.mean().item()) < 4 * sigma * CLIP / BATCH / noise.numel() ** 0.5
    trainer.extra_state()
    (mechanism,) = trainer.ledger["mechanisms"]
    assert mechanism["noise_multiplier"] == sigma and mechanism["steps"] == 1


def record_fakes(monkeypatch) -> list:
    """The fakes (and labels) every D step hands to the wrapped discriminator, recorded."""
    seen = []
    backward = dp.discriminator_backward

    def spy(pd, real, real_labels, fake, fake_labels):
        seen.append((fake.detach().clone(), fake_labels.clone()))
        return backward(pd, real, real_labels, fake, fake_labels)
    monkeypatch.setattr(dp, "discriminator_backward", spy)
    return seen


def is_prefix(short, long) -> bool:
    return len(short[0]) <= len(long[0]) and torch.equal(short[0], long[0][:len(short[0])]) \
        and torch.equal(short[1], long[1][:len(short[1])])


@pytest.mark.parametrize("recipe_d_steps", [None, 3], ids=["every-d-th-step", "recipe"])
def test_one_pool_per_generator_step_drawn_from_the_current_generator(tiny_data_root, monkeypatch, recipe_d_steps):
    """3 D steps per G step over 7 steps: D steps 1-3 use the first n of one pool, 4-6 of a new one drawn from the
    generator after its step (the same latent stream: G's output on the training generator's next inputs), step
    7 of a third."""
    trainer, G, D, split = reusing_trainer(tiny_data_root, 1.0, recipe_d_steps=recipe_d_steps)
    if recipe_d_steps is None:
        trainer.config = replace(trainer.config, d_steps_per_g_step=3)
    seen = record_fakes(monkeypatch)
    pools, drawn_by = [], {}
    for number, batch in enumerate(trainer.batches(0, 7), start=1):
        if trainer.pool.fakes is None:  # the next step draws a pool: from this generator and this latent stream
            drawn_by[number] = (copy.deepcopy(G), trainer.rng.get_state())
        trainer.optimize_parameters(batch, number)
        assert len(batch[0]) > 0, "the test wants non-empty batches"
        pools.append(None if trainer.pool.fakes is None else trainer.pool.fakes.clone())
    assert len(seen) == 7 and sorted(drawn_by) == [1, 4, 7]
    groups = [seen[0:3], seen[3:6], seen[6:7]]
    for group in groups:
        longest = max(group, key=lambda pair: len(pair[0]))
        assert all(is_prefix(pair, longest) for pair in group)  # one pool for the D steps of one G step
    for first, second in zip(groups, groups[1:]):
        assert not torch.equal(first[0][0][0], second[0][0][0])  # a generator step replaces the fakes
    assert pools[2] is None and pools[5] is None  # dropped at the generator step
    for number, (generator, rng_state) in drawn_by.items():
        rng = torch.Generator()
        rng.set_state(rng_state)
        z, labels = random_inputs(generator, trainer.pool.size, rng, "cpu")
        with torch.no_grad():
            fakes = generator(z, labels)
        used = seen[number - 1]
        assert torch.equal(used[0], fakes[:len(used[0])]) and torch.equal(used[1], labels[:len(used[1])])


def test_an_empty_batch_still_draws_the_pool(tiny_data_root):
    """When the pool is drawn never depends on the private data: an empty Poisson batch draws it too."""
    trainer, G, D, split = reusing_trainer(tiny_data_root, 1.0)
    real, labels = split.batch(torch.arange(0))
    assert dp.dp_discriminator_step(trainer.pd, G, real, labels, trainer.rng, 0, trainer.pool) is None
    assert len(trainer.pool.fakes) == trainer.pool.size == dp.fake_pool_size(BATCH, BATCH / len(split))
    assert trainer.pd.history == [(1.0, BATCH / len(split), 1)]


def test_pool_grows_by_whole_chunks_and_is_kept_until_refreshed():
    torch.manual_seed(0)
    G = Generator(channels=(12, 8, 4), bits=8)
    pool, rng = dp.FakePool(3), torch.Generator().manual_seed(5)
    fakes, labels = pool.take(G, 7, rng, "cpu")
    assert len(fakes) == len(labels) == 7 and len(pool.fakes) == 9  # three chunks of 3
    assert len({tuple(f.flatten().tolist()) for f in pool.fakes}) == 9
    again, again_labels = pool.take(G, 2, rng, "cpu")
    assert len(pool.fakes) == 9 and torch.equal(again, fakes[:2]) and torch.equal(again_labels, labels[:2])
    saved = pool.state_dict()
    pool.refresh()
    assert pool.state_dict() is None
    pool.load_state_dict(saved, "cpu")
    assert torch.equal(pool.fakes, saved["fakes"]) and torch.equal(pool.labels, saved["labels"])
    assert dp.fake_pool_size(128, 128 / 50000) == 196 and dp.fake_pool_size(32, 0.08) == 65


def test_reuse_fakes_resume_equals_uninterrupted(tiny_data_root, tmp_path, monkeypatch, no_figures):
    """Stopped at step 4 (mid generator step: the pool is in the checkpoint), resumed to 12: the uninterrupted run,
    bit for bit; the accounting is the one of fresh fakes."""
    monkeypatch.setattr(fine_tune, "write_device_artifacts", lambda run_dir, G: {})
    out = tmp_path / "out"
    write_compact(out, public_ledger(tiny_data_root))
    flags = ("--noise-multiplier", "1.0", "--reuse-fakes")
    full = load_checkpoint(fine_tune.main(fine_tune.parse_args(ft_argv(tiny_data_root, out, *flags))), "private")
    partial_dir = fine_tune.main(fine_tune.parse_args(ft_argv(tiny_data_root, out, *flags, "--max-steps", "4")))
    partial = load_checkpoint(partial_dir, "private")
    assert partial["step"] == 4 and partial["dp"]["fake_pool"] is not None
    assert len(partial["dp"]["fake_pool"]["fakes"]) == dp.fake_pool_size(32, 32 / 400)
    resumed = load_checkpoint(fine_tune.main(fine_tune.parse_args(["--out", str(out), "--resume", partial_dir,
                                                                   "--max-steps", "12"])), "private")
    assert resumed["step"] == full["step"] == 12 and resumed["args"]["reuse_fakes"] is True
    for key in ("generator", "discriminator"):
        for name, value in full[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)
    for key in ("train", "sample", "noise"):
        assert torch.equal(full["rng"][key], resumed["rng"][key]), key
    assert full["dp"]["history"] == resumed["dp"]["history"] == [(1.0, 32 / 400, 12)]
    assert full["privacy"]["mechanisms"][0]["sample_rate"] == 32 / 400


# ---------------------------------------------------------------- off: the code before the option, bit for bit

# 7 steps, 2 D steps per G step, of fine_tune.py and train_teacher.py --dp, recorded with the code before the option
BEFORE_REUSE = {
    "fine_tune": {"generator": "9fd72ad569419a30", "discriminator": "ad098d55ddb8fc09", "train": "83d90331122ef0db",
                  "sample": "296a58e3b4dd0d2c", "noise": "35959a844f7bc180"},
    "teacher": {"generator": "2f216f44aceea574", "generator_live": "66b471baabc4ceeb",
                "discriminator": "d76c90be7e4a6d9e", "train": "83d90331122ef0db", "sample": "296a58e3b4dd0d2c",
                "noise": "35959a844f7bc180"}}


def seven_dp_steps(data_root, out) -> dict:
    """Hashes of the weights and random states after 7 DP steps of both DP scripts, without --reuse-fakes."""
    write_compact(out, public_ledger(data_root))
    common = ("--noise-multiplier", "1.0", "--max-steps", "7", "--d-steps-per-g-step", "2",
              "--grad-sample-mode", "hooks")  # the default when the hashes were recorded (fused since issue 25)
    runs = {"fine_tune": load_checkpoint(fine_tune.main(fine_tune.parse_args(ft_argv(data_root, out, *common))),
                                         "private")}
    argv = teacher_argv(data_root, str(out / "teacher-run"), "--dp", "--split", "private", "--accountant", "rdp",
                        "--batch-size", "32", *common)
    runs["teacher"] = load_checkpoint(train_teacher.main(train_teacher.parse_args(argv)), "teacher")
    found = {}
    for name, checkpoint in runs.items():
        assert "fake_pool" not in checkpoint["dp"] and checkpoint["args"]["reuse_fakes"] is False
        found[name] = {key: state_hash(checkpoint[key]) for key in ("generator", "generator_live", "discriminator")
                       if key in checkpoint}
        found[name].update({key: state_hash({"s": value}) for key, value in checkpoint["rng"].items()})
    return found


def test_off_is_bit_identical_to_the_code_before_the_option(tiny_data_root, tmp_path, monkeypatch, no_figures):
    skip_unless_recorded_on()
    monkeypatch.setattr(fine_tune, "write_device_artifacts", lambda run_dir, G: {})
    assert seven_dp_steps(tiny_data_root, tmp_path / "out") == BEFORE_REUSE


def test_off_draws_fresh_fakes_every_d_step(tiny_data_root, monkeypatch):
    """Without the option (any platform): no pool, and each D step's fakes are new."""
    trainer, G, D, split = build_trainer(tiny_data_root, 1.0)
    assert trainer.pool is None and not trainer.config.reuse_fakes
    seen = record_fakes(monkeypatch)
    for number, batch in enumerate(trainer.batches(0, 3), start=1):
        trainer.optimize_parameters(batch, number)
    assert len(seen) == 3 and not any(torch.equal(a[0][:1], b[0][:1]) for a, b in zip(seen, seen[1:]))
    assert "fake_pool" not in trainer.extra_state()["dp"]
