"""Stage 5 (fine_tune.py) and the DP-SGD machinery it shares with train_teacher.py --dp (utils/privacy/dp.py).

Tiny and fast: a tiny private split (400 images), a hand-made compact checkpoint (widths 12 8 4, 8 bits), the RDP
accountant, expected batch 32 (q = 0.08, 12 D steps per epoch), one epoch.
"""
import json
import math
import os

import pytest
import torch

import fine_tune
import train_teacher
from conftest import TINY_PUBLIC, check_sample_grid, teacher_argv, tiny_data_args
from models import Discriminator, Generator
from utils.data.datasets import load_split
from utils.gan.recipe import TEACHER_EMA_DECAY
from utils.privacy import dp
from utils.privacy.ledger import compose_epsilon, epsilon, inherit, new_ledger, record_data_read, record_mechanism
from utils.run.checkpoint import (build_discriminator, build_generator, load_checkpoint, new_run_dir,
                                  unwrapped_state_dict)
from utils.run.cli import run_script
from utils.run.lifecycle import Run

DELTA = 1e-5
COMPACT_WIDTHS = (12, 8, 4)


def private_split(data_root):
    return load_split("fashion-mnist", "private", data_root, TINY_PUBLIC)


def write_teacher(out, ledger) -> str:
    """A teacher-stage checkpoint with a float Generator twice as wide as the compact one (cost ratios)."""
    G = Generator(channels=[2 * width for width in COMPACT_WIDTHS], bits=32)
    run_dir = new_run_dir(str(out), "teacher", "x")
    Run(run_dir, "teacher").save({"stage": "teacher", "step": 0, "args": {}, "parent": None, "privacy": ledger,
                                  "model_args": {"generator": G.model_args()}, "generator": unwrapped_state_dict(G)})
    return run_dir


def write_compact(out, ledger, discriminator=True, seed=0, teacher=None) -> str:
    """A compact-stage checkpoint as stage 4 writes it: an 8-bit Generator of small widths and `ledger`."""
    torch.manual_seed(seed)
    G = Generator(channels=COMPACT_WIDTHS, bits=8)
    checkpoint = {"stage": "compact", "step": 0, "args": {}, "parent": None, "privacy": ledger,
                  "model_args": {"generator": G.model_args()}, "generator": unwrapped_state_dict(G),
                  "teacher": teacher}
    if discriminator:
        D = Discriminator(channels=(8, 8))
        checkpoint["model_args"]["discriminator"] = D.model_args()
        checkpoint["discriminator"] = unwrapped_state_dict(D)
    run_dir = new_run_dir(str(out), "compact", "x")
    Run(run_dir, "compact").save(checkpoint)
    return run_dir


def public_ledger(data_root) -> dict:
    """The public-pretraining route: teacher and student read only the public split."""
    ledger = new_ledger(private_split(data_root).partition)
    record_data_read(ledger, "teacher", "public", TINY_PUBLIC, run="00000-t")
    return ledger


def ft_argv(data_root, out, *extra):
    return ["--out", str(out), *tiny_data_args(data_root), "--batch-size", "32", "--epochs", "1",
            "--accountant", "rdp", "--device", "cpu", "--log-every", "1", *extra]


def run_fine_tune(data_root, out, *extra) -> str:
    return fine_tune.main(fine_tune.parse_args(ft_argv(data_root, out, *extra)))


@pytest.fixture
def no_artifacts(monkeypatch):
    """Skip the device export (seconds) where a test is not about it."""
    monkeypatch.setattr(fine_tune, "write_device_artifacts", lambda run_dir, G: {})


@pytest.fixture(scope="module")
def public_route_run(tiny_data_root, tmp_path_factory):
    """(out, compact dir, private run dir) of a full one-epoch fine-tuning to a total target of 4."""
    out = tmp_path_factory.mktemp("public-route")
    teacher = write_teacher(out, public_ledger(tiny_data_root))
    compact = write_compact(out, public_ledger(tiny_data_root), teacher=teacher)
    return out, compact, run_fine_tune(tiny_data_root, out, "--target-epsilon", "4", "--latency-repeats", "1",
                                       "--throughput-repeats", "1", "--throughput-batch", "8")


# ---------------------------------------------------------------- the stage

def test_target_epsilon_met_and_public_route_equals_stage_alone(public_route_run):
    _, compact, run_dir = public_route_run
    checkpoint = load_checkpoint(run_dir, "private")
    ledger = checkpoint["privacy"]
    total = epsilon(ledger, DELTA, "rdp")
    assert 4.0 - 0.05 <= total <= 4.0
    (mechanism,) = ledger["mechanisms"]  # public reads append no mechanism: stage 5's epsilon is the total
    assert mechanism["stage"] == "private" and mechanism["steps"] == 12 == checkpoint["step"]
    assert mechanism["sample_rate"] == pytest.approx(32 / 400)
    alone = compose_epsilon([(mechanism["noise_multiplier"], mechanism["sample_rate"], 12)], DELTA, "rdp")
    assert total == pytest.approx(alone)
    assert ledger["public_data"] and not ledger["non_dp_reads"]
    assert checkpoint["parent"] == os.path.realpath(compact)
    assert checkpoint["dp"]["history"] == [(mechanism["noise_multiplier"], 32 / 400, 12)]


def test_outputs_metrics_and_model_card(public_route_run):
    _, _, run_dir = public_route_run
    for name in ("checkpoint.pt", "metrics.jsonl", "samples.png", "loss.png", "epsilon.png", "MODEL_CARD.md",
                 "model_card.json", "generator_int.pt", "generator.pt2", "generator.onnx", "ort_runner.py",
                 "cost.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == list(range(1, 13))  # --log-every 1
    assert [r["step"] for r in records if "epsilon" in r] == [12]  # once per epoch (one epoch here)
    check_sample_grid(os.path.join(run_dir, "samples.png"), tiles=100)
    card = json.load(open(os.path.join(run_dir, "model_card.json")))
    privacy = card["privacy"]
    assert privacy["guarantee"] is True and privacy["epsilon_total"] == pytest.approx(records[-1]["epsilon"])
    assert privacy["epsilon_this_stage"] == pytest.approx(privacy["epsilon_total"])
    assert privacy["delta"] == DELTA and privacy["accountant"] == "rdp" and privacy["secure_rng"] is False
    assert card["data"]["private_split_size"] == 400 and card["data"]["public_data_used"] is True
    assert card["artifacts"]["artifact_bytes"] == os.path.getsize(os.path.join(run_dir, "generator_int.pt"))
    text = open(os.path.join(run_dir, "MODEL_CARD.md")).read()
    assert "**Differential privacy**" in text and "torchcsprng" in text and "| teacher | public | 200 |" in text
    assert "on-device artifact: generator.onnx" in text and "float debugging export" in text
    check = card["artifacts"]["runtime_layer_check"]
    assert check["ok"] and set(check["layers"]) == {"block0", "block1", "block2"}
    assert "checked layer by layer against the compact model: 0 activations off" in text


def test_cost_of_what_ships_against_the_teacher(public_route_run):
    _, _, run_dir = public_route_run
    cost = json.load(open(os.path.join(run_dir, "cost.json")))["cost"]
    assert set(cost) == {"teacher", "teacher (ONNX Runtime)", "private (eager)", "private (ONNX Runtime)"}
    shipped = cost["private (ONNX Runtime)"]
    assert shipped["bytes"] == os.path.getsize(os.path.join(run_dir, "generator.onnx"))
    assert shipped["vs_teacher"]["bytes"] == shipped["bytes"] / cost["teacher"]["bytes"] < 1
    assert shipped["vs_teacher"]["images_per_s"] == shipped["images_per_s"] / cost["teacher"]["images_per_s"]
    card = json.load(open(os.path.join(run_dir, "model_card.json")))
    assert card["artifacts"]["cost"] == cost and card["artifacts"]["runtime_max_abs_diff"] <= 0.05


def test_checkpoint_unwrapped_and_generator_keeps_compact_shape(public_route_run):
    _, _, run_dir = public_route_run
    checkpoint = load_checkpoint(run_dir, "private")
    for key in ("generator", "discriminator"):
        assert not any(k.startswith(("_module.", "module.", "_orig_mod.")) for k in checkpoint[key])
    D = build_discriminator(checkpoint)  # loads strictly into a plain Discriminator
    assert type(D) is Discriminator
    G = build_generator(checkpoint)
    assert G.channels == COMPACT_WIDTHS and G.bits == 8
    assert set(checkpoint["rng"]) == {"train", "sample", "noise"}
    assert set(checkpoint["optimizers"]) == {"g", "d"}


def test_resume_keeps_epsilon_and_equals_uninterrupted(tiny_data_root, tmp_path, no_artifacts, no_figures):
    out = tmp_path / "out"
    write_compact(out, public_ledger(tiny_data_root))
    full = load_checkpoint(run_fine_tune(tiny_data_root, out, "--noise-multiplier", "1.0"), "private")
    partial_dir = run_fine_tune(tiny_data_root, out, "--noise-multiplier", "1.0", "--max-steps", "5")
    partial = load_checkpoint(partial_dir, "private")
    assert partial["step"] == 5 and partial["privacy"]["mechanisms"][0]["steps"] == 5
    # a resumed run keeps its own --max-steps unless it is given again
    resumed_dir = fine_tune.main(fine_tune.parse_args(["--out", str(out), "--resume", partial_dir, "--max-steps", "12"]))
    assert resumed_dir == partial_dir
    resumed = load_checkpoint(resumed_dir, "private")
    assert resumed["step"] == 12 and resumed["dp"]["history"] == [(1.0, 32 / 400, 12)]
    eps_partial, eps_resumed = (epsilon(c["privacy"], DELTA, "rdp") for c in (partial, resumed))
    assert 0 < eps_partial < eps_resumed == pytest.approx(epsilon(full["privacy"], DELTA, "rdp"))
    for key in ("generator", "discriminator"):
        for name, value in full[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)
    for key in ("train", "sample", "noise"):
        assert torch.equal(full["rng"][key], resumed["rng"][key])
    records = [json.loads(line) for line in open(os.path.join(resumed_dir, "metrics.jsonl"))]
    full_records = [json.loads(line) for line in open(os.path.join(full["run_dir"], "metrics.jsonl"))]
    losses = ("step", "epoch", "d_loss", "g_loss")  # the stopped run also logged epsilon at its last step, 5
    assert [{k: r.get(k) for k in losses} for r in records] == [{k: r.get(k) for k in losses} for r in full_records]
    assert records[-1]["epsilon"] == full_records[-1]["epsilon"]
    assert [r["step"] for r in records] == list(range(1, 13))


def test_exceeded_target_refused_naming_epsilon(tiny_data_root, tmp_path, capsys):
    out = tmp_path / "out"
    ledger = public_ledger(tiny_data_root)
    record_mechanism(ledger, "teacher", 0.7, 0.08, 50, 1.0, "rdp", run="00000-t")
    write_compact(out, ledger)
    spent = epsilon(ledger, DELTA, "rdp")
    code = run_script(fine_tune.main, fine_tune.parse_args, ft_argv(tiny_data_root, out, "--target-epsilon", "2"))
    err = capsys.readouterr().err
    assert code == 2 and f"the earlier stages' epsilon is {spent:.3f}" in err
    assert not os.path.exists(out / "private")  # refused before any run directory


@pytest.mark.parametrize("argv, message", [
    (["--delta", "0.0025"], "must be below 1/N = 2.50e-03"),
    (["--public-size", "300"], "is not the one this model's ledger covers"),
])
def test_bad_delta_or_partition_refused(tiny_data_root, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    write_compact(out, public_ledger(tiny_data_root))
    code = run_script(fine_tune.main, fine_tune.parse_args, ft_argv(tiny_data_root, out, *argv))
    assert code == 2 and message in capsys.readouterr().err


def test_only_the_private_split(tiny_data_root, tmp_path):
    with pytest.raises(SystemExit) as exc:
        fine_tune.parse_args(ft_argv(tiny_data_root, tmp_path, "--split", "public"))
    assert exc.value.code == 2


def test_non_dp_ledger_runs_but_says_no_guarantee(tiny_data_root, tmp_path, capsys, no_artifacts):
    out = tmp_path / "out"
    ledger = new_ledger(private_split(tiny_data_root).partition)
    record_data_read(ledger, "teacher", "private", 400, run="00000-t")
    write_compact(out, ledger, discriminator=False)  # a fresh discriminator is built
    run_dir = run_fine_tune(tiny_data_root, out, "--target-epsilon", "3")
    assert "carries NO differential-privacy guarantee" in capsys.readouterr().err
    card = json.load(open(os.path.join(run_dir, "model_card.json")))["privacy"]
    assert card["guarantee"] is False and card["epsilon_total"] == "inf"
    assert 3.0 - 0.05 <= card["epsilon_this_stage"] <= 3.0  # calibrated to the target alone
    assert "NO differential-privacy guarantee" in open(os.path.join(run_dir, "MODEL_CARD.md")).read()
    assert epsilon(load_checkpoint(run_dir, "private")["privacy"], DELTA, "rdp") == math.inf


def test_dp_teacher_route_composes(tiny_data_root, tmp_path, no_artifacts, capsys):
    out = str(tmp_path / "out")
    argv = teacher_argv(tiny_data_root, out, "--dp", "--split", "private", "--accountant", "rdp",
                        "--target-epsilon", "3", "--batch-size", "32")
    argv.remove("--max-steps")
    argv.remove("3")  # the whole planned epoch, so the teacher spends its target
    teacher_dir = train_teacher.main(train_teacher.parse_args(argv))
    teacher = load_checkpoint(teacher_dir, "teacher")
    assert not teacher["privacy"]["non_dp_reads"] and teacher["privacy"]["mechanisms"][0]["stage"] == "teacher"
    # the weight average is the --dp default too (measured on route 2): what later stages sample is the average
    assert teacher["recipe"]["average"]["max_decay"] == TEACHER_EMA_DECAY
    assert any(not torch.equal(teacher["generator"][k], teacher["generator_live"][k]) for k in teacher["generator"])
    eps_teacher = epsilon(teacher["privacy"], DELTA, "rdp")
    assert 2.95 <= eps_teacher <= 3.0
    write_compact(out, inherit(teacher["privacy"]))  # stages 2-4 are post-processing: the ledger is copied
    run_dir = run_fine_tune(tiny_data_root, out, "--target-epsilon", "5")
    ledger = load_checkpoint(run_dir, "private")["privacy"]
    assert [m["stage"] for m in ledger["mechanisms"]] == ["teacher", "private"]
    total = epsilon(ledger, DELTA, "rdp")
    own = compose_epsilon([tuple(ledger["mechanisms"][1][k] for k in ("noise_multiplier", "sample_rate", "steps"))],
                          DELTA, "rdp")
    assert 5.0 - 0.05 <= total <= 5.0 and total > eps_teacher and total > own
    # what the run reports (metrics.jsonl, the data of epsilon.png, the model card) is the composed total
    records = [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if "epsilon" in r]
    assert records and records[-1]["step"] == 12
    assert records[-1]["epsilon"] == pytest.approx(total, rel=1e-9)
    assert records[-1]["epsilon_stage"] == pytest.approx(own, rel=1e-9) and own < total - 0.1
    card = json.load(open(os.path.join(run_dir, "model_card.json")))["privacy"]
    assert card["epsilon_total"] == pytest.approx(total, rel=1e-9)
    assert f"({total:.3f}, {DELTA:g})-differential privacy" in capsys.readouterr().out  # what the script prints


def test_teacher_dp_needs_private_split(tiny_data_root, tmp_path, capsys):
    code = run_script(train_teacher.main, train_teacher.parse_args, teacher_argv(tiny_data_root, str(tmp_path), "--dp"))
    assert code == 2 and "--split private" in capsys.readouterr().err


# ---------------------------------------------------------------- the DP steps

def tiny_private_discriminator(data_root, batch_size=32, noise=1.0, clip=1.0):
    torch.manual_seed(0)
    G, D = Generator(channels=COMPACT_WIDTHS, bits=8), Discriminator(channels=(8, 8))
    config = dp.DPConfig(max_grad_norm=clip, accountant="rdp", grad_sample_mode=dp.DEFAULT_GRAD_SAMPLE_MODE)
    pd = dp.PrivateDiscriminator(D, torch.optim.Adam(D.parameters()), private_split(data_root), batch_size, noise,
                                 config, seed=0)
    return G, D, pd


def test_generator_step_takes_no_accountant_step(tiny_data_root):
    G, D, pd = tiny_private_discriminator(tiny_data_root)
    rng = torch.Generator().manual_seed(0)
    real, labels = pd.next_batch()
    dp.dp_discriminator_step(pd, G, real, labels, rng)
    assert pd.history == [(1.0, 32 / 400, 1)]
    d_before = [(p.detach().clone(), p.grad.clone(), p.grad_sample) for p in D.parameters()]
    g_before = [p.detach().clone() for p in G.parameters()]
    dp.dp_generator_step(pd, G, torch.optim.Adam(G.parameters()), 32, rng, "cpu")
    assert pd.history == [(1.0, 32 / 400, 1)]
    for (value, grad, grad_sample), p in zip(d_before, D.parameters()):  # D untouched, hooks were off
        assert torch.equal(value, p) and torch.equal(grad, p.grad) and p.grad_sample is grad_sample
    assert any(not torch.equal(a, b) for a, b in zip(g_before, G.parameters()))
    pd.empty_step()  # an empty Poisson batch still is a (noisy) DP step
    assert pd.history == [(1.0, 32 / 400, 2)]


def test_weight_average_and_adaptive_d_steps_under_dp_resume_exactly_and_cost_no_privacy(tiny_data_root, tmp_path,
                                                                                          no_artifacts, no_figures):
    out = tmp_path / "out"
    write_compact(out, public_ledger(tiny_data_root))
    recipe = ["--noise-multiplier", "1.0", "--ema-decay", "0.9", "--adaptive-d-steps", "--d-steps-per-g-step", "2"]
    plain = load_checkpoint(run_fine_tune(tiny_data_root, out, "--noise-multiplier", "1.0"), "private")
    full_dir = run_fine_tune(tiny_data_root, out, *recipe)
    full = load_checkpoint(full_dir, "private")
    records = [json.loads(line) for line in open(os.path.join(full_dir, "metrics.jsonl"))]
    assert {r["d_steps"] for r in records if "d_steps" in r} == {2}  # the schedule's rung, logged
    assert 0 <= [r["fake_accuracy"] for r in records if "fake_accuracy" in r][-1] <= 1
    partial_dir = run_fine_tune(tiny_data_root, out, *recipe, "--max-steps", "5")
    resumed = load_checkpoint(fine_tune.main(fine_tune.parse_args(["--out", str(out), "--resume", partial_dir,
                                                                   "--max-steps", str(full["step"])])), "private")
    assert full["privacy"]["mechanisms"] == [dict(m, run=full["privacy"]["mechanisms"][0]["run"])
                                             for m in plain["privacy"]["mechanisms"]]  # the same accounting
    assert full["recipe"]["average"]["step"] == full["step"] // 2  # one update per generator step
    assert any(not torch.equal(full["generator"][k], full["generator_live"][k]) for k in full["generator"])
    for key in ("generator", "generator_live", "discriminator"):
        for name, value in full[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)
    assert full["recipe"]["schedule"] == resumed["recipe"]["schedule"]
    assert build_generator(full).bits == 8  # the average is the released, compact 8-bit generator
