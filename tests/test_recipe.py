"""Building blocks of the training recipe: the generator weight average (utils/gan/ema.py), the hinge loss
(utils/gan/losses.py), DiffAugment (utils/gan/augment.py) and the D-steps schedule (utils/gan/dsteps.py)."""
import importlib

import pytest
import torch
from torch import nn

from models import Discriminator, Generator
from utils.gan.augment import cutout, cutout_mask, diff_augment, parse_policy, translation
from utils.gan.dsteps import LADDER, DStepsSchedule, fake_accuracy
from utils.gan.ema import WeightAverage, warmup_decay
from utils.gan.losses import GAN_LOSSES, hinge_d_loss, hinge_g_loss


def tiny_generator(bits=32, seed=0):
    torch.manual_seed(seed)
    return Generator(nz=8, num_classes=10, channels=(8, 4, 2), bits=bits)


@torch.no_grad()
def perturb(model, seed):
    rng = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=rng))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.add_(torch.randn(module.running_mean.shape, generator=rng))


# ---------------------------------------------------------------- weight average

def test_warmup_decay_starts_low_and_caps():
    assert warmup_decay(0) == pytest.approx(0.1) and warmup_decay(10) == pytest.approx(11 / 20)
    assert warmup_decay(10_000) == 0.995 and warmup_decay(10_000, max_decay=0.9) == 0.9


def test_average_follows_the_ema_formula_and_copies_buffers():
    G = tiny_generator()
    average = WeightAverage(G)
    expected = [p.detach().clone() for p in G.parameters()]
    for t in range(3):
        perturb(G, seed=t)
        decay = warmup_decay(t)
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, G.parameters())]
        average.update(G)
    assert average.step == 3
    for e, p in zip(expected, average.model.parameters()):
        assert torch.allclose(e, p, atol=1e-6)
    for a, b in zip(average.model.buffers(), G.buffers()):
        assert torch.equal(a, b)
    assert not any(p.requires_grad for p in average.model.parameters()) and not average.model.training


def test_average_of_a_quantised_pruned_generator_stays_consistent():
    G = tiny_generator(bits=8)
    average = WeightAverage(G)
    with torch.no_grad():
        G.block0.norm.alive[1] = False
        G.block0.norm.enforce_dead()
    perturb(G, seed=5)
    G.block0.norm.enforce_dead()
    average.update(G)
    norm = average.model.block0.norm
    assert norm.weight[1] == 0 and norm.bias[1] == 0  # the dead channel is exactly dead in the average too
    conv = average.model.block1.conv
    scale = conv.weight.detach().abs().amax(dim=(0, 2, 3)) / 127
    assert torch.allclose(conv.weight_scale, scale)  # the averaged weights' scales, not the live model's


def test_restored_average_continues_exactly_as_an_uninterrupted_one():
    G = tiny_generator()
    straight, interrupted = WeightAverage(G), WeightAverage(G)
    for t in range(4):
        perturb(G, seed=t)
        straight.update(G)
        if t < 2:
            interrupted.update(G)
        if t == 1:
            state = interrupted.state_dict()
            interrupted = WeightAverage(tiny_generator(seed=9))  # a fresh process: other initial weights
            interrupted.load_state_dict(state)
        elif t > 1:
            interrupted.update(G)
    assert interrupted.step == straight.step == 4
    for a, b in zip(straight.model.state_dict().values(), interrupted.model.state_dict().values()):
        assert torch.equal(a, b)


def test_bad_decay_is_refused():
    with pytest.raises(ValueError):
        WeightAverage(tiny_generator(), max_decay=1.0)


# ---------------------------------------------------------------- losses

def test_hinge_loss_values_and_margins():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0  # beyond the margins: no loss
    assert set(GAN_LOSSES) == {"non-saturating", "hinge"} and GAN_LOSSES["hinge"].d is hinge_d_loss


# ---------------------------------------------------------------- DiffAugment

def test_translation_moves_content_by_at_most_an_eighth_and_fills_background():
    x = torch.full((64, 1, 28, 28), -1.0)
    x[:, :, 13, 13] = 1.0
    moved = translation(x, torch.Generator().manual_seed(0))
    rows, cols = [], []
    for image in moved[:, 0]:
        (r, c), = (image == 1.0).nonzero().tolist()
        rows.append(r - 13)
        cols.append(c - 13)
        assert (image == -1.0).sum() == 28 * 28 - 1
    assert max(map(abs, rows + cols)) <= 4 and len(set(rows)) > 3 and len(set(cols)) > 3
    edge = translation(torch.ones(200, 1, 28, 28), torch.Generator().manual_seed(1))
    assert (edge == -1.0).any() and set(edge.unique().tolist()) <= {-1.0, 1.0}  # shifted-in pixels are background


def test_cutout_blanks_one_square_of_at_most_half_the_size():
    mask = cutout_mask((50, 1, 28, 28), torch.Generator().manual_seed(0))
    blanked = (mask == 0).sum(dim=(1, 2, 3))
    assert blanked.max() <= 14 * 14 and blanked.min() > 0
    x = torch.rand(50, 1, 28, 28)
    out = cutout(x, torch.Generator().manual_seed(0))
    assert torch.equal(out[mask.bool()], x[mask.bool()]) and (out[~mask.bool()] == -1.0).all()


def test_diff_augment_is_differentiable_seeded_and_policy_checked():
    x = torch.rand(8, 1, 28, 28, requires_grad=True)
    policy = parse_policy("translation,cutout")
    out = diff_augment(x, policy, torch.Generator().manual_seed(0))
    out.sum().backward()
    assert out.shape == x.shape and x.grad is not None and x.grad.abs().sum() > 0
    again = diff_augment(x.detach(), policy, torch.Generator().manual_seed(0))
    assert torch.equal(out.detach(), again)
    assert diff_augment(x, parse_policy("none"), torch.Generator()) is x
    with pytest.raises(ValueError, match="unknown augmentation"):
        parse_policy("translation,colour")


# ---------------------------------------------------------------- D steps per G step

def test_constant_schedule_never_moves():
    schedule = DStepsSchedule(d_steps=5)
    assert all(schedule.after_g_step(0.0) == 5 for _ in range(500))


def test_adaptive_schedule_climbs_the_ladder_after_grace_when_d_is_fooled():
    schedule = DStepsSchedule(d_steps=1, adaptive=True, grace=10)
    assert [schedule.after_g_step(0.9) for _ in range(50)] == [1] * 50  # D wins: stay
    rungs = [schedule.after_g_step(0.3) for _ in range(2000)]
    assert sorted(set(rungs)) == list(LADDER) and rungs[-1] == LADDER[-1]  # every rung in order, then the top
    assert all(rungs[i] <= rungs[i + 1] for i in range(len(rungs) - 1))
    average, crossed = 0.9, None  # the running average of D's accuracy on fakes, by hand
    for i in range(len(rungs)):
        average = 0.99 * average + 0.01 * 0.3
        if average <= 0.6:
            crossed = i
            break
    assert rungs.index(2) == crossed  # the first move is the step the average reaches the threshold
    changes = [i for i in range(1, len(rungs)) if rungs[i] != rungs[i - 1]]
    assert all(b - a >= 10 for a, b in zip(changes, changes[1:]))  # at least `grace` G steps between moves


def test_adaptive_schedule_state_round_trips_and_bad_start_is_refused():
    schedule = DStepsSchedule(d_steps=2, adaptive=True, grace=3)
    for accuracy in (0.5, 0.4, 0.3, 0.2):
        schedule.after_g_step(accuracy)
    restored = DStepsSchedule()
    restored.load_state_dict(schedule.state_dict())
    assert restored == schedule
    assert [restored.after_g_step(0.1) for _ in range(5)] == [schedule.after_g_step(0.1) for _ in range(5)]
    with pytest.raises(ValueError, match="rung"):
        DStepsSchedule(d_steps=3, adaptive=True)


class ConstantD(nn.Module):
    def __init__(self, logit):
        super().__init__()
        self.logit = logit

    def forward(self, images, labels):
        return torch.full((len(images),), self.logit)


def test_fake_accuracy_reads_only_generated_samples():
    G = tiny_generator()
    rng = torch.Generator().manual_seed(0)
    assert fake_accuracy(G, ConstantD(-1.0), 16, rng, "cpu") == 1.0
    assert fake_accuracy(G, ConstantD(1.0), 16, rng, "cpu") == 0.0
    D = Discriminator(num_classes=10, channels=(4, 4))
    assert 0.0 <= fake_accuracy(G, D, 16, rng, "cpu") <= 1.0 and G.training


# ---------------------------------------------------------------- the recipe as one object

def recipe_parser():
    import argparse
    from utils.gan.recipe import add_recipe_args
    parser = argparse.ArgumentParser()
    add_recipe_args(parser, ema_decay=0.995)
    parser.add_argument("--d-steps", type=int, default=1)  # a stage's own constant
    return parser


def test_recipe_options_parse_and_old_args_get_defaults():
    import argparse
    from utils.gan.recipe import RecipeConfig
    args = recipe_parser().parse_args(["--loss", "hinge", "--augment", "translation,cutout", "--d-steps", "5",
                                       "--adaptive-d-steps"])
    config = RecipeConfig.from_args(args)
    assert config == RecipeConfig("hinge", ("translation", "cutout"), 0.995, 5, True)
    assert RecipeConfig.from_args(argparse.Namespace(seed=0)) == RecipeConfig()  # a run saved before the recipe
    assert RecipeConfig.from_args(argparse.Namespace(), d_steps=5).d_steps == 5
    for bad in (["--augment", "rotate"], ["--ema-decay", "1"], ["--loss", "wgan"]):
        with pytest.raises(SystemExit):
            recipe_parser().parse_args(bad)


def test_recipe_schedules_g_steps_and_updates_the_average_it_samples_with():
    from utils.gan.recipe import Recipe, RecipeConfig
    G = tiny_generator()
    plain = Recipe(RecipeConfig(), G, seed=0)
    assert [plain.g_step_due() for _ in range(3)] == [True] * 3 and plain.sampling_generator(G) is G
    recipe = Recipe(RecipeConfig(ema_decay=0.9, d_steps=2), G, seed=0)
    assert [recipe.g_step_due() for _ in range(4)] == [False, True, False, True]
    perturb(G, seed=1)
    recipe.after_g_step(G)
    averaged = recipe.sampling_generator(G)
    assert averaged is recipe.average.model and recipe.average.step == 1
    assert not torch.equal(averaged.block0.conv.weight, G.block0.conv.weight)


def test_recipe_augments_real_and_fake_alike_and_its_state_round_trips():
    from utils.gan.recipe import Recipe, RecipeConfig
    G, seen = tiny_generator(), []

    def D(images, labels):
        seen.append(images)
        return images.mean(dim=(1, 2, 3))

    config = RecipeConfig(loss="hinge", augment=("cutout",), ema_decay=0.5, adaptive_d_steps=True)
    recipe = Recipe(config, G, seed=0)
    real = torch.ones(6, 1, 28, 28)
    recipe.d_loss(D, real, torch.zeros(6, dtype=torch.long), real.clone(), torch.zeros(6, dtype=torch.long))
    assert all((images == -1.0).any() for images in seen)  # cutout on the real and on the fake batch
    recipe.after_g_step(G, recipe.before_g_step(G, Discriminator(channels=(4, 4)), 8, "cpu"))
    copy = Recipe(config, tiny_generator(seed=3), seed=7)
    copy.load_state_dict(recipe.state_dict(), recipe.average.model.state_dict())
    assert "model" not in recipe.state_dict()["average"]  # the checkpoint's generator holds the weights
    assert torch.equal(copy.augment(real), recipe.augment(real)) and copy.schedule == recipe.schedule
    for a, b in zip(copy.average.model.state_dict().values(), recipe.average.model.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- the probe benchmark

def test_recipe_probe_measures_the_live_generator_and_its_average(tiny_data_root, tmp_path, capsys):
    import importlib.util
    import json
    import math
    import os
    from conftest import ROOT, TINY_D, TINY_G, tiny_data_args
    spec = importlib.util.spec_from_file_location("recipe_probe",
                                                  os.path.join(ROOT, "benchmarks", "probes", "recipe_probe.py"))
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    argv = [*tiny_data_args(tiny_data_root), "--out", str(tmp_path), "--results-dir", str(tmp_path / "res"),
            "--steps", "4", "--batch-size", "16", "--g-channels", *TINY_G, "--d-channels", *TINY_D,
            "--loss", "hinge", "--augment", "translation,cutout", "--adaptive-d-steps", "--eval-samples", "50",
            "--protocol", "none", "--device", "cpu", "--desc", "t"]
    run_dir = probe.main(probe.parse_args(argv))
    result = json.load(open(os.path.join(run_dir, "probe.json")))
    assert [row["generator"] for row in result["rows"]] == ["live", "average"]
    for row in result["rows"]:
        assert math.isfinite(row["fd"]) and 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
        assert os.path.getsize(os.path.join(run_dir, f"samples-{row['generator']}.png")) > 0
    assert result["rows"][0]["fd"] != result["rows"][1]["fd"]
    assert capsys.readouterr().out.count("| t | loss hinge, augment translation,cutout") == 2


@pytest.mark.parametrize("script", ["fine_tune", "train_teacher"])
def test_adaptive_schedule_off_the_ladder_is_refused_before_anything_is_written(script, tmp_path, capsys):
    """--adaptive-d-steps from a D-steps count that is not a rung: one argparse line, exit 2, nothing under --out."""
    module = importlib.import_module(script)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        module.parse_args(["--adaptive-d-steps", "--d-steps-per-g-step", "3", "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--adaptive-d-steps" in err[0] and "not 3" in err[0]
    assert not out.exists()
    assert module.parse_args(["--adaptive-d-steps", "--d-steps-per-g-step", "5"]).d_steps_per_g_step == 5
