"""Two student options for the compact-model target (train_student.py, utils/compression/slimming.py): `--penalty
params` (each channel's L1 weight by its share of the parameters only, through `channel_costs`) and the recovery
phase `--init-student RUN` (the student continues from a pruned student: its dead channels stay dead, its widths,
bits, BatchNorm mode and discriminator are kept, conflicting flags and another teacher's student are refused)."""
import argparse
import copy
import json
import os

import pytest
import torch

import train_student
from compress_student import compress_checked
from conftest import FP32
from models import Discriminator, Generator
from utils.compression.slimming import (ChannelCost, channel_costs, enforce_dead, gamma_parameters, layer_costs,
                                        penalty_weights, proximal_step, slimming_step)
from utils.run.checkpoint import build_discriminator, build_generator, load_checkpoint, new_run_dir, save_checkpoint
from utils.run.cli import UserError

# ---------------------------------------------------------------- --penalty params

PARAMS_ONLY = ChannelCost(params=1.0, macs=0.0)


def test_params_penalty_weights_channels_by_their_parameters_only():
    # the 28x28 default widths: a block0 channel carries more parameters than a block1 channel (its 7x7 kernel over
    # the latent and embedding), but fewer MACs (it runs once per image, at 1x1 input)
    G = Generator()
    params = [p for p, _ in layer_costs(G)]
    assert params[0] > params[1]
    weights = penalty_weights(G, "params")
    assert weights == channel_costs(G, ChannelCost(params=1, macs=0))
    assert weights[0] > weights[1]
    cost = penalty_weights(G, "cost")
    assert cost == channel_costs(G) and cost[1] > cost[0]  # "cost" unchanged: it prunes block1 first
    assert penalty_weights(G, "uniform") is None
    # over live widths, like "cost": a dead channel carries nothing
    G.block1.norm.alive[:100] = False
    assert penalty_weights(G, "params") == channel_costs(G, PARAMS_ONLY) != weights


def tiny_pair(seed=0):
    torch.manual_seed(seed)
    G = Generator(nz=40, channels=(6, 4, 4), bits=8)
    with torch.no_grad():
        G.block0.norm.weight[1] = 0.0
    proximal_step(G, lr=0.1, rho=0.0)  # a dead channel: the weights are over live widths
    return G, Discriminator(channels=(4, 4))


def batch_of(G, n=8):
    rng = torch.Generator().manual_seed(1)
    z, labels = G.sample_inputs(n, generator=rng)
    return z, labels, torch.rand(n, 1, 28, 28, generator=rng) * 2 - 1


@pytest.mark.parametrize("penalty,cost", [("uniform", None), ("cost", ChannelCost(params=1, macs=1)),
                                          ("params", ChannelCost(params=1, macs=0))])
def test_the_step_thresholds_each_layer_by_its_penalty_weight(penalty, cost):
    """slimming_step with `penalty` equals a step without L1 followed by the proximal step of lr * rho times
    `channel_costs(G, cost)`, bit for bit."""
    G, D = tiny_pair()
    H, E = copy.deepcopy(G), copy.deepcopy(D)
    args = train_student.parse_args([])
    rho, batch = 0.5, batch_of(G)
    optimizers = train_student.make_optimizers(args, G, D)
    slimming_step(G, D, optimizers, batch, beta=20.0, rho=rho, penalty=penalty)
    reference = train_student.make_optimizers(args, H, E)
    slimming_step(H, E, reference, batch, beta=20.0, rho=0.0)
    proximal_step(H, args.lr_gamma, rho, None if cost is None else channel_costs(H, cost))
    enforce_dead(H, (reference["g"], reference["gamma"]))
    for a, b in zip(gamma_parameters(G), gamma_parameters(H)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- --init-student: the recovery phase

def recovery_argv(out, init, *extra):
    """student_argv without --distill-dir: a recovery run reads its init student's own distillation set."""
    return ["--out", str(out), "--init-student", str(init), "--batch-size", "16", "--max-steps", "4",
            "--log-every", "1", "--checkpoint-every", "2", "--device", "cpu", *FP32, *extra]


@pytest.fixture(scope="module")
def recovered(tiny_student_run, tmp_path_factory):
    """(init checkpoint, recovered checkpoint, the link it was named by): 4 steps at rho 0 from the tiny pruned
    student, named by a symlink to its run directory."""
    tmp = tmp_path_factory.mktemp("recovery")
    link = tmp / "pruned-student"
    os.symlink(tiny_student_run[1], link)
    run_dir = train_student.main(train_student.parse_args(recovery_argv(tmp / "out", link, "--rho", "0")))
    return load_checkpoint(tiny_student_run[1], "student"), load_checkpoint(run_dir, "student"), link


def test_recovery_keeps_exactly_the_dead_channels_while_the_live_weights_train(recovered):
    init, done, _ = recovered
    before, after = build_generator(init), build_generator(done)
    assert after.bits == before.bits == 8 and after.channels == before.channels
    assert sum(before.active_channels()) < sum(before.channels)  # the fixture pruned some
    assert after.active_channels() == before.active_channels()  # rho 0: no new channel died
    for old, new in zip(before.blocks(), after.blocks()):
        assert torch.equal(old.norm.alive, new.norm.alive)
        dead = ~new.norm.alive
        assert (new.norm.weight[dead] == 0).all() and (new.norm.bias[dead] == 0).all()
        assert not torch.equal(old.norm.weight[~dead], new.norm.weight[~dead])
        # the frozen BatchNorm statistics it was pruned under (a teacher-initialised student's) stay as they were
        assert torch.equal(old.norm.running_mean, new.norm.running_mean)
    # the convs trained too (not every one: this tiny student's last block is almost pruned away, its activations
    # quantise to 0, so its conv gets no gradient)
    assert not torch.equal(before.block0.conv.weight, after.block0.conv.weight)
    assert done["args"]["norm_stats"] == "frozen"
    assert (done["args"]["quant_bits"], done["args"]["width_mult"]) == (8, 1.0)


def test_compression_of_the_recovered_student_has_the_pruned_widths(recovered):
    init, done, _ = recovered
    compact, check = compress_checked(build_generator(done).eval(), argparse.Namespace(check_samples=64, seed=0))
    assert list(compact.channels) == build_generator(init).active_channels()
    assert check["max_abs_diff"] <= 1e-5


def test_recovery_records_where_it_came_from_and_inherits_the_ledger(recovered):
    init, done, link = recovered
    assert done["args"]["init_student"] == init["run_dir"] != str(link)  # the run itself, not the link naming it
    with open(os.path.join(done["run_dir"], "args.json")) as file:  # as written, before the checkpoint's path rules
        assert json.load(file)["init_student"] == init["run_dir"] != str(link)
    assert done["parent"] == init["parent"] and done["teacher"] == init["teacher"]
    assert done["privacy"] == init["privacy"]
    assert os.path.basename(done["run_dir"]).endswith("-recovery")


def test_a_resumed_recovery_run_needs_no_init_student_and_equals_the_uninterrupted_one(recovered, tmp_path,
                                                                                     monkeypatch, no_figures):
    init, whole, _ = recovered
    part = train_student.main(train_student.parse_args(
        recovery_argv(tmp_path / "out", init["run_dir"], "--rho", "0", "--max-steps", "2")))

    def unread(args):
        raise AssertionError("a resumed run read its --init-student again")
    monkeypatch.setattr(train_student, "load_init_student", unread)
    resumed = train_student.main(train_student.parse_args(["--out", str(tmp_path / "out"), "--resume", part,
                                                           "--max-steps", "4", "--device", "cpu"]))
    done = load_checkpoint(resumed, "student")
    assert done["step"] == 4
    for key in ("generator", "discriminator"):
        assert all(torch.equal(whole[key][name], done[key][name]) for name in whole[key]), key


def test_recovery_starts_from_the_init_students_generator_and_discriminator(tiny_student_run):
    init = load_checkpoint(tiny_student_run[1], "student")
    teacher = load_checkpoint(init["teacher"], "teacher")
    args = train_student.parse_args(["--d-init", "teacher"])
    G, D = train_student.build_models(args, None, teacher, init)
    for name, value in G.state_dict().items():
        assert torch.equal(value, init["generator"][name]), name
    for name, value in D.state_dict().items():
        assert torch.equal(value, init["discriminator"][name]), name
    # a student checkpoint without a discriminator: per --d-init
    _, D = train_student.build_models(args, None, teacher, {k: v for k, v in init.items() if k != "discriminator"})
    assert all(torch.equal(value, teacher["discriminator"][name]) for name, value in D.state_dict().items())
    assert not torch.equal(build_discriminator(init).state_dict()["net.0.weight"],
                           teacher["discriminator"]["net.0.weight"])  # the student's own D had trained


@pytest.mark.parametrize("flags,message", [(["--quant-bits", "4"], "--quant-bits 4 conflicts"),
                                           (["--width-mult", "0.5"], "--width-mult 0.5 conflicts"),
                                           (["--init", "teacher"], "--init teacher conflicts")])
def test_flags_that_contradict_the_init_student_are_refused(tiny_student_run, tmp_path, flags, message):
    argv = recovery_argv(tmp_path / "out", tiny_student_run[1], "--dry-run", *flags)
    with pytest.raises(UserError, match=message):
        train_student.main(train_student.parse_args(argv))
    assert not os.path.exists(tmp_path / "out")
    # the same values as the init student's are no conflict
    same = recovery_argv(tmp_path / "out", tiny_student_run[1], "--dry-run", "--quant-bits", "8", "--width-mult", "1")
    assert train_student.main(train_student.parse_args(same)) is None


def test_a_student_of_another_teacher_is_refused(handmade_pipeline, tiny_distill_run, tmp_path):
    _, _, _, other_student = handmade_pipeline
    argv = recovery_argv(tmp_path / "out", other_student, "--distill-dir", tiny_distill_run[1], "--dry-run")
    with pytest.raises(UserError, match="was distilled from teacher"):
        train_student.main(train_student.parse_args(argv))


def test_a_student_with_another_ledger_is_refused(tiny_student_run, tmp_path):
    forged = load_checkpoint(tiny_student_run[1], "student")
    forged["privacy"] = {**forged["privacy"], "public_data": forged["privacy"]["public_data"] + [{"run": "x"}]}
    run_dir = new_run_dir(str(tmp_path / "other"), "student", "forged")
    save_checkpoint(run_dir, forged)
    argv = recovery_argv(tmp_path / "out", run_dir, "--dry-run")
    with pytest.raises(UserError, match="its privacy ledger is not the distillation set"):
        train_student.main(train_student.parse_args(argv))
