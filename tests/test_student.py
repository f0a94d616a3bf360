"""Stage 3 (train_student.py) and GAN Slimming's sparsity (utils/compression/slimming.py): the proximal step, dead
channels that stay exactly zero, pruning with rho > 0, initialisation, checkpoint contents and exact resume."""
import argparse
import json
import os

import pytest
import torch

import train_student
from conftest import student_argv
from models import Discriminator, Generator
from utils.compression.slimming import enforce_dead, gamma_parameters, proximal_step, slimming_step
from utils.run.checkpoint import build_generator, load_checkpoint, read_metrics
from utils.run.cli import UserError


def tiny_models(bits=8):
    torch.manual_seed(0)
    G = Generator(nz=8, channels=(6, 4, 4), bits=bits)
    return G, Discriminator(channels=(4, 4))


def tiny_optimizers(G, D):
    args = train_student.parse_args(["--lr-g", "1e-2"])  # a large lr: stale momentum would show
    return train_student.make_optimizers(args, G, D)


def random_batch(G, n=8, seed=0):
    rng = torch.Generator().manual_seed(seed)
    z, labels = G.sample_inputs(n, generator=rng)
    return z, labels, torch.rand(n, 1, 28, 28, generator=rng) * 2 - 1


def test_proximal_step_shrinks_and_zeroes():
    G, _ = tiny_models()
    values = torch.tensor([0.5, -0.5, 0.001, -0.0009, 0.0, 0.0011])
    with torch.no_grad():
        G.block0.norm.weight.copy_(values)
    proximal_step(G, lr=0.1, rho=0.01)  # threshold 0.001
    expected = torch.tensor([0.499, -0.499, 0.0, 0.0, 0.0, 0.0001])
    assert torch.allclose(G.block0.norm.weight, expected, atol=1e-7)
    assert G.block0.norm.alive.tolist() == [True, True, False, False, False, True]
    assert G.active_channels() == [3, 4, 4]


def test_rho_zero_changes_nothing():
    G, _ = tiny_models()
    before = [g.clone() for g in gamma_parameters(G)]
    proximal_step(G, lr=0.1, rho=0.0)
    assert all(torch.equal(a, b) for a, b in zip(before, gamma_parameters(G)))


def test_dead_channels_stay_exactly_zero():
    G, D = tiny_models()
    optimizers = tiny_optimizers(G, D)
    for step in range(2):  # every channel gets momentum and Adam moments, as one has when it dies in training
        slimming_step(G, D, optimizers, random_batch(G, seed=100 + step), beta=20.0, rho=0.0)
    with torch.no_grad():
        G.block0.norm.weight[[1, 4]] = 0.0
        G.block1.norm.weight[2] = 0.0
    proximal_step(G, lr=0.1, rho=0.0)  # gammas at exactly 0 die even without shrinkage
    enforce_dead(G, optimizers.values())
    live_before = G.block0.norm.weight[[0, 2, 3, 5]].clone()
    outputs = {}
    for name in ("block0", "block1"):
        getattr(G, name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    for step in range(4):
        slimming_step(G, D, optimizers, random_batch(G, seed=step), beta=20.0, rho=0.0)
        for name, dead in (("block0", [1, 4]), ("block1", [2])):
            norm = getattr(G, name).norm
            assert norm.alive.logical_not().nonzero().flatten().tolist() == dead
            assert (norm.weight[dead] == 0).all() and (norm.bias[dead] == 0).all()
            assert (outputs[name][:, dead] == 0).all()
            for param in (norm.weight, norm.bias):
                for state in (optimizers["gamma"].state.get(param, {}), optimizers["g"].state.get(param, {})):
                    for value in state.values():
                        if torch.is_tensor(value) and value.shape == param.shape:
                            assert (value[dead] == 0).all()
    assert (G.block0.norm.weight[[0, 2, 3, 5]] != live_before).all()  # while the live channels trained
    G.eval()
    G(*random_batch(G)[:2])
    assert (outputs["block0"][:, [1, 4]] == 0).all() and (outputs["block1"][:, 2] == 0).all()


def test_student_init_from_teacher_and_widths(tiny_teacher_run):
    teacher = build_generator(load_checkpoint(tiny_teacher_run[1], "teacher"))
    args = argparse.Namespace(width_mult=1.0, init="auto", quant_bits=4)
    student = train_student.build_student(args, teacher)
    assert student.bits == 4 and student.channels == teacher.channels
    teacher_state = teacher.state_dict()
    for name, value in student.state_dict().items():
        if not name.endswith("weight_scale"):
            assert torch.equal(value, teacher_state[name]), name
    assert student.to_image.weight_scale.ne(1).all()  # scales refreshed for the quantised layers

    half = train_student.build_student(argparse.Namespace(width_mult=0.5, init="auto", quant_bits=8), teacher)
    assert half.channels == tuple(c // 2 for c in teacher.channels)
    with pytest.raises(UserError, match="--init teacher needs"):
        train_student.build_student(argparse.Namespace(width_mult=0.5, init="teacher", quant_bits=8), teacher)


def run_student(out, distill_dir, *extra):
    return train_student.main(train_student.parse_args(student_argv(str(out), distill_dir, *extra)))


def test_rho_prunes_channels_and_checkpoint_is_complete(tiny_teacher_run, tiny_distill_run, tiny_student_run,
                                                       tmp_path):
    sparse = tiny_student_run[1]  # the same settings with --rho 2.5
    dense = run_student(tmp_path / "dense", tiny_distill_run[1], "--rho", "0")
    dense_ckpt, sparse_ckpt = load_checkpoint(dense, "student"), load_checkpoint(sparse, "student")
    assert build_generator(dense_ckpt).active_channels() == list(build_generator(dense_ckpt).channels)
    assert sum(build_generator(sparse_ckpt).active_channels()) < sum(build_generator(dense_ckpt).active_channels())
    assert min(build_generator(sparse_ckpt).active_channels()) > 0  # what the fixture promises its users
    # metrics and figures
    records = read_metrics(sparse)
    assert records[0]["step"] == 0 and records[-1]["step"] == 4
    assert records[-1]["active_channels"] == build_generator(sparse_ckpt).active_channels()
    for name in ("samples.png", "loss.png", "sparsity.png", "summary.json", "args.json"):
        assert os.path.isfile(os.path.join(sparse, name)), name
    # checkpoint contents: lineage, unchanged ledger, networks that rebuild without flags
    distill = load_checkpoint(tiny_distill_run[1], "distill")
    assert sparse_ckpt["parent"] == distill["run_dir"] and sparse_ckpt["teacher"] == tiny_teacher_run[1]
    assert sparse_ckpt["privacy"] == distill["privacy"]
    assert set(sparse_ckpt["optimizers"]) == {"g", "gamma", "d"}
    student = build_generator(sparse_ckpt)
    assert student.bits == 8 and "discriminator" in sparse_ckpt["model_args"]
    for norm in (block.norm for block in student.blocks()):
        assert (norm.weight[~norm.alive] == 0).all() and (norm.bias[~norm.alive] == 0).all()
    assert json.load(open(os.path.join(sparse, "args.json")))["distill_dir"] == distill["run_dir"]


@pytest.mark.parametrize("recipe", [[], ["--loss", "hinge", "--augment", "translation,cutout"]])
def test_resume_reproduces_an_uninterrupted_run(tiny_distill_run, tmp_path, recipe, no_figures):
    whole = run_student(tmp_path / "whole", tiny_distill_run[1], "--rho", "2.5", "--max-steps", "5", *recipe)
    part = run_student(tmp_path / "part", tiny_distill_run[1], "--rho", "2.5", "--max-steps", "2", *recipe)
    assert load_checkpoint(part, "student")["step"] == 2
    resumed = train_student.main(train_student.parse_args(["--out", str(tmp_path / "part"), "--resume",
                                                           "--max-steps", "5", "--device", "cpu"]))
    assert resumed == part
    a, b = load_checkpoint(whole, "student"), load_checkpoint(resumed, "student")
    assert b["step"] == 5
    for key in ("generator", "discriminator"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    strip = lambda records: [{k: v for k, v in r.items() if k != "time"} for r in records]  # noqa: E731
    assert strip(read_metrics(whole)) == strip(read_metrics(resumed))
    assert torch.equal(a["recipe"]["rng"], b["recipe"]["rng"])  # the augmentations continue where they stopped
    assert b["args"]["loss"] == ("hinge" if recipe else "non-saturating")
