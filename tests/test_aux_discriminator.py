"""The teacher's narrow discriminator for the DP stage (train_teacher.py --dp-d-channels, train_student.py --d-init
teacher-dp): a second, seeded discriminator without a minibatch std layer, trained beside the teacher's own on the
same real batches, the same fakes and the same augmented views, with the same loss and precision and its own Adam
(D's learning rate and betas). It changes nothing else: the generator, D and the weight average are bit-identical
with and without it. It is saved (float32, under DP_DISCRIMINATOR), snapshotted and resumed exactly, and with
--d-init teacher-dp it is the discriminator the student starts from, the compact run carries and the DP stage trains.

One tiny chain (module fixture): two teachers (D 8/8 with a minibatch std layer, DiffAugment, --lr-d and --beta2),
one with --dp-d-channels 4 6 and one without; the distillation set of the first, a student with --d-init teacher-dp,
its compact model and one tiny DP fine-tuning.
"""
import copy
import json
import os
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
from opacus.validators import ModuleValidator

import compress_student
import create_dataset
import fine_tune
import train_student
import train_teacher
from conftest import distill_argv, student_argv, teacher_argv, tiny_data_args
from models import Discriminator, Generator
from utils.gan.augment import diff_augment
from utils.gan.losses import hinge_d_loss
from utils.gan.recipe import Recipe, RecipeConfig
from utils.gan.steps import NonPrivateStep, random_inputs
from utils.privacy import dp
from utils.run.checkpoint import DP_DISCRIMINATOR, build_discriminator, load_checkpoint
from utils.run.cli import run_script
from utils.run.lifecycle import snapshot_file
from utils.run.precision import FP32, Precision

NARROW_WIDTHS = ["4", "6"]
NARROW = ("--dp-d-channels", *NARROW_WIDTHS)
# D's own settings, not the defaults: the narrow discriminator's Adam must take them
TEACHER_FLAGS = ("--max-steps", "4", "--checkpoint-every", "2", "--log-every", "1", "--minibatch-std", "2",
                 "--augment", "translation,cutout", "--lr-d", "3e-4", "--beta2", "0.99")


def run_teacher(data_root, out, *extra, argv=None) -> str:
    """A tiny teacher with TEACHER_FLAGS (or exactly `argv`), without its figures (test_teacher draws them)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_teacher, "save_training_figures", lambda *args, **kwargs: None)
        argv = argv or teacher_argv(data_root, str(out), *TEACHER_FLAGS, *extra)
        return train_teacher.main(train_teacher.parse_args(argv))


@pytest.fixture(scope="module")
def chain(tiny_data_root, tmp_path_factory):
    """{name: run dir}: plain (the teacher without the flag), narrow (with it, and a snapshot at step 2), distill
    (of narrow), student (--d-init teacher-dp), compact and private (its DP fine-tuning, no device export)."""
    out = tmp_path_factory.mktemp("aux-d")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fine_tune, "write_device_artifacts", lambda run_dir, G: {})
        runs = {"plain": run_teacher(tiny_data_root, out / "plain"),
                "narrow": run_teacher(tiny_data_root, out, *NARROW, "--snapshot-steps", "2")}
        runs["distill"] = create_dataset.main(create_dataset.parse_args(
            distill_argv(str(out), "--teacher-dir", runs["narrow"])))
        runs["student"] = train_student.main(train_student.parse_args(
            student_argv(str(out), runs["distill"], "--d-init", "teacher-dp")))
        runs["compact"] = compress_student.main(compress_student.parse_args(
            ["--out", str(out), "--student-dir", runs["student"], "--check-samples", "64", "--latency-repeats", "1",
             "--throughput-repeats", "1", "--throughput-batch", "8", "--device", "cpu"]))
        runs["private"] = fine_tune.main(fine_tune.parse_args(
            ["--out", str(out), *tiny_data_args(tiny_data_root), "--generator-dir", runs["compact"], "--batch-size",
             "32", "--epochs", "1", "--target-epsilon", "4", "--accountant", "rdp", "--device", "cpu"]))
    return runs


def same_states(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[name], b[name]) for name in a)


def same_optimizer_state(a: dict, b: dict) -> bool:
    return a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys() and all(
        same_states(a["state"][key], b["state"][key]) for key in a["state"])


def test_the_flag_adds_the_narrow_discriminator_and_changes_nothing_else(chain):
    plain, narrow = load_checkpoint(chain["plain"], "teacher"), load_checkpoint(chain["narrow"], "teacher")
    for key in ("generator", "generator_live", "discriminator"):  # the weight average, the live G, D: bit for bit
        assert same_states(plain[key], narrow[key]), key
    for key in ("g", "d"):
        assert same_optimizer_state(plain["optimizers"][key], narrow["optimizers"][key]), key
    assert torch.equal(plain["rng"]["train"], narrow["rng"]["train"])
    assert torch.equal(plain["recipe"]["rng"], narrow["recipe"]["rng"])  # the augmentations: no draw of its own
    assert set(narrow) - set(plain) == {DP_DISCRIMINATOR} and set(narrow["optimizers"]) == {"g", "d", "dp_d"}
    # its shape: the data's, the given widths, never a minibatch std layer (D has one); float32 on disk
    shape = narrow["model_args"]
    assert shape["discriminator"]["minibatch_std"] == 2
    assert shape[DP_DISCRIMINATOR] == {**shape["discriminator"], "channels": [4, 6], "minibatch_std": 0}
    assert all(value.dtype == torch.float32 for value in narrow[DP_DISCRIMINATOR].values())
    # its own Adam with D's learning rate and betas
    d_group, narrow_group = (narrow["optimizers"][key]["param_groups"][0] for key in ("d", "dp_d"))
    assert (narrow_group["lr"], narrow_group["betas"]) == (d_group["lr"], d_group["betas"]) == (3e-4, (0.5, 0.99))
    # the metrics: the same losses, and the narrow discriminator's own
    records = [[json.loads(line) for line in open(os.path.join(chain[name], "metrics.jsonl"))]
               for name in ("plain", "narrow")]
    losses = [[(r["d_loss"], r["g_loss"]) for r in rows if "d_loss" in r] for rows in records]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    assert all("dp_d_loss" in r for r in records[1] if "d_loss" in r)
    with open(os.path.join(chain["narrow"], "args.json")) as file:
        assert json.load(file)["dp_d_channels"] == [4, 6]
    assert plain["args"]["dp_d_channels"] is None


def test_snapshot_keeps_it_and_resume_equals_the_uninterrupted_run(chain, tiny_data_root, tmp_path):
    part = run_teacher(tiny_data_root, tmp_path, *NARROW, "--max-steps", "2")
    at_2 = load_checkpoint(part, "teacher")
    resumed = run_teacher(None, None, argv=["--out", str(tmp_path), "--resume", part, "--max-steps", "4",
                                            "--device", "cpu"])
    whole, done = load_checkpoint(chain["narrow"], "teacher"), load_checkpoint(resumed, "teacher")
    assert done["step"] == 4
    for key in ("generator", "generator_live", "discriminator", DP_DISCRIMINATOR):
        assert same_states(whole[key], done[key]), key
    assert same_optimizer_state(whole["optimizers"]["dp_d"], done["optimizers"]["dp_d"])
    snapshot = load_checkpoint(os.path.join(chain["narrow"], snapshot_file(2)), "teacher")
    assert snapshot["step"] == 2 and snapshot["model_args"][DP_DISCRIMINATOR]["channels"] == [4, 6]
    assert same_states(snapshot[DP_DISCRIMINATOR], at_2[DP_DISCRIMINATOR])
    assert not same_states(snapshot[DP_DISCRIMINATOR], whole[DP_DISCRIMINATOR])  # it trained on


def tiny_step(precision, narrow: bool, loss="non-saturating"):
    """A NonPrivateStep of tiny fixed networks (seed 0), with DiffAugment and a weight average, and with the
    narrow discriminator 4/6 beside D when `narrow`; and the networks as they start."""
    torch.manual_seed(0)
    G, D, N = Generator(nz=8, channels=(16, 8, 4)), Discriminator(channels=(8, 8)), Discriminator(channels=(4, 6))
    start = copy.deepcopy({"G": G, "N": N})
    optimizers = {"g": torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999)),
                  "d": torch.optim.Adam(D.parameters(), 1e-3, betas=(0.5, 0.9))}
    if narrow:
        optimizers["dp_d"] = torch.optim.Adam(N.parameters(), 1e-3, betas=(0.5, 0.9))
    recipe = Recipe(RecipeConfig(loss=loss, augment=("translation", "cutout"), ema_decay=0.9), G, 3)
    start["recipe_rng"] = recipe.rng.get_state()
    step = NonPrivateStep(G, D, optimizers, [None], 1, {}, 3, "cpu", recipe, precision, N if narrow else None)
    return step, start


def fixed_batch(number: int):
    rng = torch.Generator().manual_seed(number)
    return torch.rand(8, 1, 28, 28, generator=rng) * 2 - 1, torch.randint(0, 10, (8,), generator=rng)


def test_one_step_is_its_own_adam_step_on_ds_views_of_the_same_images_with_ds_loss():
    step, start = tiny_step(FP32, narrow=True, loss="hinge")
    real, labels = fixed_batch(1)
    losses = step.optimize_parameters((real, labels), 1)
    # by hand: the fakes of the step's first draw, the recipe's first two augmentations, hinge, one Adam step
    G, N = start["G"], start["N"]
    initial = copy.deepcopy(N.state_dict())
    z, fake_labels = random_inputs(G, 8, torch.Generator().manual_seed(3), "cpu")
    with torch.no_grad():
        fake = G(z, fake_labels)
    views = torch.Generator()
    views.set_state(start["recipe_rng"])
    real_view, fake_view = (diff_augment(x, ("translation", "cutout"), views) for x in (real, fake))
    optimizer = torch.optim.Adam(N.parameters(), 1e-3, betas=(0.5, 0.9))
    loss = hinge_d_loss(N(real_view, labels), N(fake_view, fake_labels))
    loss.backward()
    optimizer.step()
    trained = step.side.network.state_dict()
    assert same_states(trained, N.state_dict()) and losses["dp_d_loss"] == loss.item()
    # every weight trained (the logit's bias need not: under hinge its gradient is 0 while all logits lie inside
    # the margins)
    assert all(not torch.equal(trained[name], initial[name]) for name in initial if name.endswith("weight"))


@pytest.mark.parametrize("precision", [FP32, Precision("bf16", channels_last=True)], ids=["fp32", "bf16"])
def test_g_d_and_the_average_are_bit_identical_with_and_without_it(precision):
    steps = {narrow: tiny_step(precision, narrow)[0] for narrow in (False, True)}
    autocast_on = []
    steps[True].side.network.register_forward_pre_hook(lambda *_: autocast_on.append(torch.is_autocast_enabled("cpu")))
    for number in (1, 2, 3):
        for step in steps.values():
            step.optimize_parameters(fixed_batch(number), number)
    without, beside = ({name: net.state_dict() for name, net in step.models().items()} for step in steps.values())
    assert set(beside) - set(without) == {DP_DISCRIMINATOR}
    for name in without:  # generator (the average), generator_live, discriminator
        assert same_states(without[name], beside[name]), name
    # the narrow one runs in D's precision: autocast per forward pass, channels-last, float32 master weights
    assert autocast_on and set(autocast_on) == {precision.bf16}
    weight = steps[True].side.network.net[0].weight
    assert weight.dtype == torch.float32
    assert weight.is_contiguous(memory_format=torch.channels_last) == precision.channels_last


def test_a_fresh_one_follows_the_seed_and_draws_nothing_from_the_global_generator():
    split = SimpleNamespace(image_shape=(1, 28, 28), num_classes=10)
    built = []
    for seed, disturb in ((0, 1), (0, 2), (1, 1)):
        torch.manual_seed(disturb)
        before = torch.get_rng_state()
        built.append(train_teacher.build_dp_discriminator(Namespace(dp_d_channels=[4, 6], seed=seed, minibatch_std=2),
                                                          None, split))
        assert torch.equal(torch.get_rng_state(), before)
    assert same_states(built[0].state_dict(), built[1].state_dict()) and built[0].minibatch_std == 0
    assert not torch.equal(built[0].net[0].weight, built[2].net[0].weight)
    assert train_teacher.build_dp_discriminator(Namespace(dp_d_channels=None, seed=0), None, split) is None


def test_the_student_the_compact_run_and_the_dp_stage_take_it(chain):
    teacher, student = load_checkpoint(chain["narrow"], "teacher"), load_checkpoint(chain["student"], "student")
    args = train_student.parse_args(["--d-init", "teacher-dp"])
    train_student.resolve_d_init(args)
    args.width_mult, args.quant_bits = 1.0, 8
    _, start = train_student.build_models(args, None, teacher)
    assert same_states(start.state_dict(), teacher[DP_DISCRIMINATOR])
    assert student["model_args"]["discriminator"] == teacher["model_args"][DP_DISCRIMINATOR]
    assert student["args"]["d_init"] == "teacher-dp"
    compact = load_checkpoint(chain["compact"], "compact")
    assert compact["model_args"]["discriminator"] == teacher["model_args"][DP_DISCRIMINATOR]
    assert same_states(compact["discriminator"], student["discriminator"])
    _, dp_start = fine_tune.build_models(compact, torch.device("cpu"))
    assert same_states(dp_start.state_dict(), compact["discriminator"])
    private = build_discriminator(load_checkpoint(chain["private"], "private"))
    assert private.channels == (4, 6) and private.minibatch_std == 0
    assert not torch.equal(private.net[0].weight, dp_start.net[0].weight)  # the DP stage trained it
    dp.register_opacus_validators()
    assert ModuleValidator.validate(private, strict=True) == []


def refused(script, argv, capsys, out) -> str:
    code = run_script(script.main, script.parse_args, argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert not os.path.exists(out)
    return err


def test_refusals_in_one_line_before_anything_is_written(chain, tiny_data_root, tmp_path, capsys):
    out = tmp_path / "out"
    dp_teacher = teacher_argv(tiny_data_root, str(out), "--dp", "--split", "private", *NARROW)
    assert refused(train_teacher, dp_teacher, capsys, out).startswith(
        "error: --dp-d-channels applies to the non-private teacher only")
    assert refused(train_teacher, teacher_argv(tiny_data_root, str(out), "--dp-d-channels", "4"), capsys,
                   out).startswith("error: --dp-d-channels: discriminator channels must be")
    without = student_argv(str(out), chain["distill"], "--teacher-dir", chain["plain"], "--d-init", "teacher-dp")
    assert refused(train_student, without, capsys, out).startswith(
        f"error: --d-init teacher-dp: teacher {chain['plain']} has no narrow discriminator")
    both = student_argv(str(out), chain["distill"], "--d-init", "teacher-dp", "--d-channels", "4", "6")
    assert refused(train_student, both, capsys, out).startswith(
        "error: --d-init teacher-dp contradicts --d-channels 4 6")
