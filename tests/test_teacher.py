import json
import math
import os

import torch

import train_teacher
from conftest import TINY_PUBLIC, check_sample_grid, teacher_argv
from utils.data.datasets import load_split, seeded_subset
from utils.privacy.ledger import epsilon
from utils.run.checkpoint import build_generator, load_checkpoint
from utils.run.cli import run_script


def run_teacher(data_root, out, *extra):
    return train_teacher.main(train_teacher.parse_args(teacher_argv(data_root, out, *extra)))


def test_teacher_run_writes_everything(tiny_teacher_run):
    out, run_dir = tiny_teacher_run
    for name in ("checkpoint.pt", "args.json", "metrics.jsonl", "samples.png", "loss.png"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    checkpoint = load_checkpoint(os.path.join(out, "teacher", "latest"), "teacher")
    G = build_generator(checkpoint)
    assert G.bits == 32 and checkpoint["step"] == 3
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [3]  # --log-every 50: the last step only
    assert math.isfinite(records[-1]["d_loss"]) and math.isfinite(records[-1]["g_loss"])
    check_sample_grid(os.path.join(run_dir, "samples.png"), tiles=100)  # 10 classes x 10
    assert not any(key.startswith(("_module.", "module.")) for key in checkpoint["discriminator"])
    ledger = checkpoint["privacy"]
    assert ledger["non_dp_reads"] == [] and ledger["public_data"][0]["split"] == "public"
    assert epsilon(ledger, 1e-5) == 0.0


def test_private_split_without_dp_means_infinite_epsilon(tiny_data_root, tmp_path, capsys):
    """On a seeded subset of the private split (--subset): the subset is recorded in the checkpoint and the ledger."""
    run_dir = run_teacher(tiny_data_root, str(tmp_path), "--split", "private", "--max-steps", "1", "--subset", "40")
    checkpoint = load_checkpoint(run_dir, "teacher")
    ledger, subset = checkpoint["privacy"], checkpoint["data"]["subset"]
    assert ledger["non_dp_reads"] == [{"stage": "teacher", "split": "private", "size": 40,
                                       "run": os.path.basename(run_dir), "subset": subset}]
    private = load_split("fashion-mnist", "private", tiny_data_root, TINY_PUBLIC)
    assert subset == seeded_subset(private, 40, 0).subset and checkpoint["data"]["size"] == 40
    assert epsilon(ledger, 1e-5) == math.inf
    assert "NO differential-privacy guarantee" in capsys.readouterr().err


def test_resume_continues_and_matches_an_uninterrupted_run(tiny_data_root, tmp_path):
    straight = run_teacher(tiny_data_root, str(tmp_path / "a"), "--max-steps", "6", "--checkpoint-every", "2")
    interrupted = run_teacher(tiny_data_root, str(tmp_path / "b"), "--max-steps", "4", "--checkpoint-every", "2")
    assert load_checkpoint(interrupted)["step"] == 4
    resumed = train_teacher.main(train_teacher.parse_args(
        ["--out", str(tmp_path / "b"), "--resume", "--max-steps", "6"]))
    assert resumed == interrupted
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert b["step"] == 6
    for key in a["generator"]:
        assert torch.allclose(a["generator"][key].float(), b["generator"][key].float(), atol=1e-6), key
    steps = [json.loads(line)["step"] for line in open(os.path.join(resumed, "metrics.jsonl"))]
    assert steps == sorted(set(steps))


def test_dry_run_and_bad_numbers(tmp_path, capsys):
    assert run_script(train_teacher.main, train_teacher.parse_args, ["--dry-run", "--out", str(tmp_path)]) == 0
    assert '"epochs": 30' in capsys.readouterr().out and not os.listdir(tmp_path)
    try:
        train_teacher.parse_args(["--epochs", "0"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("--epochs 0 was accepted")


def test_generator_rebuilds_with_one_call(tiny_teacher_run):
    out, _ = tiny_teacher_run
    checkpoint = load_checkpoint(os.path.join(out, "teacher", "latest"))
    G = build_generator(checkpoint).eval()
    for name, value in G.state_dict().items():
        assert torch.equal(value, checkpoint["generator"][name]), name
    z = torch.randn(1, G.nz).expand(2, -1)
    images = G(z, torch.tensor([0, 7]))
    assert images.shape == (2, 1, 28, 28) and (images[0] - images[1]).abs().max() > 0  # the label is used


def test_weight_average_is_what_is_saved_for_sampling_and_is_restored_on_resume(tiny_data_root, tmp_path,
                                                                               monkeypatch):
    recipe = ["--loss", "hinge", "--augment", "translation,cutout", "--adaptive-d-steps", "--checkpoint-every", "2"]
    sampled = []
    monkeypatch.setattr(train_teacher, "save_training_figures", lambda run_dir, G, *a, **k: sampled.append(G))
    straight = run_teacher(tiny_data_root, str(tmp_path / "a"), "--max-steps", "6", *recipe)
    run_teacher(tiny_data_root, str(tmp_path / "b"), "--max-steps", "4", *recipe)
    resumed = train_teacher.main(train_teacher.parse_args(["--out", str(tmp_path / "b"), "--resume", "--max-steps",
                                                           "6"]))
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a["recipe"]["average"] == {"step": 6, "max_decay": 0.995}  # one update per generator step
    assert any(not torch.equal(a["generator"][k], a["generator_live"][k]) for k in a["generator"])
    for key in ("generator", "generator_live", "discriminator"):  # the average continues exactly after a resume
        for name in a[key]:
            assert torch.allclose(a[key][name].float(), b[key][name].float(), atol=1e-6), (key, name)
    assert torch.equal(a["recipe"]["rng"], b["recipe"]["rng"]) and a["recipe"]["schedule"] == b["recipe"]["schedule"]
    logged = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
    assert [(r["d_steps"], r["fake_accuracy"]) for r in logged if "d_steps" in r][-1] == (
        a["recipe"]["schedule"]["d_steps"], a["recipe"]["schedule"]["average"])  # the rung and its trigger, logged
    plain_log = [json.loads(line) for line in open(os.path.join(run_teacher(  # a constant schedule logs no rung
        tiny_data_root, str(tmp_path / "d"), "--max-steps", "2"), "metrics.jsonl"))]
    assert plain_log and not any("d_steps" in r for r in plain_log)
    for G in (sampled[0], build_generator(a)):  # the sample grid and every later stage use the average
        for name, value in G.state_dict().items():
            assert torch.equal(value.cpu(), a["generator"][name]), name
    plain = load_checkpoint(run_teacher(tiny_data_root, str(tmp_path / "c"), "--max-steps", "2", "--ema-decay", "0"))
    assert "generator_live" not in plain and plain["recipe"]["average"] is None


def test_recipe_flags_reach_the_networks_and_optimisers(tiny_data_root, tmp_path):
    """--lr-d, --beta2, --minibatch-std and a third discriminator width are what the run trains with, and what a
    resumed run keeps."""
    run_dir = run_teacher(tiny_data_root, str(tmp_path), "--max-steps", "2", "--lr-d", "1e-3", "--beta2", "0.99",
                          "--minibatch-std", "4", "--d-channels", "8", "8", "8")
    resumed = train_teacher.main(train_teacher.parse_args(["--resume", run_dir, "--max-steps", "3"]))
    checkpoint = load_checkpoint(resumed, "teacher")
    groups = {name: opt["param_groups"][0] for name, opt in checkpoint["optimizers"].items()}
    assert (groups["d"]["lr"], groups["g"]["lr"]) == (1e-3, 2e-4)
    assert tuple(groups["d"]["betas"]) == tuple(groups["g"]["betas"]) == (0.5, 0.99)
    assert checkpoint["step"] == 3
    assert {k: checkpoint["model_args"]["discriminator"][k] for k in ("channels", "minibatch_std")} == \
        {"channels": [8, 8, 8], "minibatch_std": 4}


def test_default_discriminator_is_the_measured_recipe_without_dp_and_the_models_with_dp(tiny_data_root):
    """Without --d-channels a non-private 28-pixel teacher gets the recipe's discriminator (128/256/512, issue 23's
    measurement); a DP teacher keeps the model's default (64/128: not measured under DP); --d-channels wins."""
    def d_widths(*extra):
        args = train_teacher.parse_args(["--data-root", tiny_data_root, "--public-size", str(TINY_PUBLIC), *extra])
        split = load_split(args.dataset, args.split, args.data_root, args.public_size)
        return train_teacher.build_models(args, None, split)[1].channels

    assert d_widths() == (128, 256, 512)
    assert d_widths("--dp", "--split", "private") == (64, 128)
    assert d_widths("--d-channels", "8", "8") == (8, 8)
