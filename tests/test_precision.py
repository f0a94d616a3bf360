"""`--precision` (utils/run/precision.py) and `--snapshot-steps`: fp32 is today's code path bit for bit; bf16 autocast
covers each forward pass and nothing else; a bf16 run's checkpoint is float32 and samples in float32; `auto` falls
back to fp32 where bf16 is not native; the DP paths stay float32; snapshots are kept at the chosen steps, survive a
resume and are read by evaluate.py."""
import hashlib
import json
import os

import numpy as np
import torch

import create_dataset
import evaluate
import train_student
import train_teacher
from conftest import (TINY_PUBLIC, distill_argv, skip_unless_recorded_on, state_hash, student_argv, teacher_argv,
                      tiny_data_args)
from test_reliability import refused
from utils.data.datasets import load_split, to_unit_range
from utils.evaluation import metrics
from utils.gan.steps import NonPrivateStep
from utils.run import precision
from utils.run.checkpoint import build_generator, load_checkpoint
from utils.run.precision import FP32, Precision, resolve_precision

# What the tiny pipeline below produced at commit 54572a4, before --precision existed (torch 2.14.1, x86_64 CPU
# with AVX-512, 1 thread): weight hashes of each stage's checkpoint, the distillation images, the evaluation's
# numbers and the logits of the protocol's classifier.
BEFORE_PRECISION = {
    "generator": "740f3da420e89291", "generator_live": "655ac23937d92edd", "discriminator": "903b0ad9967619e2",
    "distill_images": "9b32a5ee288b4cfc", "student_generator": "19d33dbb93ce24ed",
    "student_discriminator": "19a4776e0168ea97", "fd": 6.55774051137326, "precision": 0.0, "recall": 0.0,
    "downstream_accuracy": 0.10000000149011612, "real_protocol_logits": "446417d92ce6f3eb"}


def tiny_pipeline(data_root, out, *flags) -> dict:
    """Teacher (6 steps), distillation set, student (4 steps), evaluation of the teacher, all with `flags`."""
    teacher = train_teacher.main(train_teacher.parse_args(teacher_argv(data_root, out, "--max-steps", "6", *flags)))
    checkpoint = load_checkpoint(teacher, "teacher")
    found = {key: state_hash(checkpoint[key]) for key in ("generator", "generator_live", "discriminator")}
    distill = create_dataset.main(create_dataset.parse_args(distill_argv(out, "--teacher-dir", teacher, *flags)))
    found["distill_images"] = hashlib.sha256(np.load(os.path.join(distill, "images.npy")).tobytes()).hexdigest()[:16]
    student = load_checkpoint(train_student.main(train_student.parse_args(
        student_argv(out, distill, "--rho", "2.5", *flags))), "student")
    found.update(student_generator=state_hash(student["generator"]),
                 student_discriminator=state_hash(student["discriminator"]))
    argv = ["--out", out, *tiny_data_args(data_root), "--device", "cpu", "--num-fd-samples", "100",
            "--num-downstream-samples", "240", "--downstream-epochs", "2", "--classifier-epochs", "1",
            "--audit-samples", "100", "--audit-members", "50", "--latency-repeats", "2", "--throughput-repeats", "1",
            "--max-steps", "5", "--runs", teacher, *flags]
    row = json.load(open(os.path.join(evaluate.main(evaluate.parse_args(argv)), "results.json")))["rows"][0]
    found.update({key: row[key] for key in ("fd", "precision", "recall", "downstream_accuracy")})
    return found


def protocol_logits(data_root, chosen: Precision, monkeypatch) -> str:
    """A hash of every logit the protocol's classifier produced, trained on the tiny real training set."""
    digest, original = hashlib.sha256(), metrics.predict

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        digest.update(out.numpy().tobytes())
        return out
    monkeypatch.setattr(metrics, "predict", spy)
    train, test = (load_split("fashion-mnist", split, data_root, TINY_PUBLIC) for split in ("all", "test"))
    metrics.protocol_accuracy(to_unit_range(train.images), train.labels, to_unit_range(test.images), test.labels,
                              metrics.protocol_variant(metrics.PROTOCOL, 600, 3), precision=chosen)
    return digest.hexdigest()[:16]


def native_bf16(monkeypatch, supported: bool):
    """Pretend the CPU runs bf16 natively or not (bf16 autocast runs on any CPU, only slower without it)."""
    reason = "pretended by the test" if supported else "this CPU has neither AVX-512 BF16 nor AMX (pretended)"
    monkeypatch.setattr(precision, "bf16_support", lambda device: (supported, reason))


def test_fp32_is_bit_identical_to_the_code_before_the_option(tiny_data_root, tmp_path, monkeypatch, no_figures):
    skip_unless_recorded_on()
    found = tiny_pipeline(tiny_data_root, str(tmp_path), "--precision", "fp32")
    found["real_protocol_logits"] = protocol_logits(tiny_data_root, resolve_precision("fp32", "cpu"), monkeypatch)
    assert found == BEFORE_PRECISION


def test_bf16_covers_each_forward_pass_and_nothing_else(tiny_data_root):
    """Under bf16, D and G run inside autocast and hand float32 to the losses; no optimiser step, no weight-average
    update and nothing after the step runs with autocast on (a context left open would keep serving stale bf16
    casts of the weights: benchmarks/results/recipe.md)."""
    from models import Discriminator, Generator
    from utils.gan.recipe import Recipe, RecipeConfig
    G, D = Generator(nz=8, channels=(16, 8, 4)), Discriminator(channels=(8, 8))
    optimizers = {"g": torch.optim.Adam(G.parameters()), "d": torch.optim.Adam(D.parameters())}
    seen = {"forward": [], "optimizer": [], "outputs": []}
    for network in (G, D):
        network.register_forward_pre_hook(lambda *_: seen["forward"].append(torch.is_autocast_enabled("cpu")))
    for optimizer in optimizers.values():
        optimizer.register_step_pre_hook(lambda *_: seen["optimizer"].append(torch.is_autocast_enabled("cpu")))
    recipe = Recipe(RecipeConfig(ema_decay=0.9), G, 0)
    average_update = recipe.average.update
    recipe.average.update = lambda model: (seen["optimizer"].append(torch.is_autocast_enabled("cpu")),
                                           average_update(model))
    step = NonPrivateStep(G, D, optimizers, [None], 1, {}, 0, "cpu", recipe, Precision("bf16", channels_last=True))
    step.forward_d = spy_outputs(step.forward_d, seen["outputs"])
    for number in (1, 2):
        step.optimize_parameters((torch.rand(8, 1, 28, 28) * 2 - 1, torch.arange(8) % 10), number)
    assert seen["forward"] and all(seen["forward"])
    assert len(seen["optimizer"]) == 6 and not any(seen["optimizer"])
    assert {t.dtype for t in seen["outputs"]} == {torch.float32}
    assert not torch.is_autocast_enabled("cpu")
    assert all(p.dtype == torch.float32 for p in [*G.parameters(), *D.parameters()])


def spy_outputs(forward, outputs: list):
    def recorded(*inputs):
        outputs.append(forward(*inputs))
        return outputs[-1]
    return recorded


def test_bf16_run_is_float32_on_disk_and_samples_in_float32(tiny_data_root, tmp_path, monkeypatch, capsys):
    native_bf16(monkeypatch, True)
    run_dir = train_teacher.main(train_teacher.parse_args(teacher_argv(
        tiny_data_root, str(tmp_path / "bf16"), "--max-steps", "4", "--precision", "bf16")))
    assert "teacher: precision bf16 autocast + channels-last" in capsys.readouterr().out
    checkpoint = load_checkpoint(run_dir, "teacher")
    tensors = [t for key in ("generator", "generator_live", "discriminator") for t in checkpoint[key].values()]
    tensors += [t for opt in checkpoint["optimizers"].values() for s in opt["state"].values() for t in s.values()
                if t.dim()]
    floats = [t for t in tensors if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 and t.is_contiguous() for t in floats)
    G = build_generator(checkpoint).eval()
    images = G(*G.sample_inputs(20))
    assert images.dtype == torch.float32 and torch.isfinite(images).all() and images.abs().max() <= 1
    fp32 = load_checkpoint(train_teacher.main(train_teacher.parse_args(teacher_argv(
        tiny_data_root, str(tmp_path / "fp32"), "--max-steps", "4", "--precision", "fp32"))), "teacher")
    assert state_hash(fp32["generator_live"]) != state_hash(checkpoint["generator_live"])  # bf16 really ran


def test_auto_falls_back_to_fp32_where_bf16_is_not_native(tiny_data_root, tmp_path, monkeypatch, capsys):
    native_bf16(monkeypatch, False)
    chosen = resolve_precision(None, "cpu")
    assert chosen.name == "fp32" and "auto: this CPU has neither" in chosen.describe()
    auto = load_checkpoint(train_teacher.main(train_teacher.parse_args(teacher_argv(
        tiny_data_root, str(tmp_path / "auto"), "--max-steps", "3", "--precision", "auto"))), "teacher")
    assert "teacher: precision fp32 (auto: this CPU has neither" in capsys.readouterr().out
    fp32 = load_checkpoint(train_teacher.main(train_teacher.parse_args(teacher_argv(
        tiny_data_root, str(tmp_path / "fp32"), "--max-steps", "3", "--precision", "fp32"))), "teacher")
    assert state_hash(auto["generator_live"]) == state_hash(fp32["generator_live"])
    out = str(tmp_path / "refused")
    os.makedirs(out)
    capsys.readouterr()
    refused(train_teacher, teacher_argv(tiny_data_root, out, "--precision", "bf16"), capsys, out)


def test_dp_paths_stay_float32(tiny_data_root, tmp_path, monkeypatch, capsys):
    native_bf16(monkeypatch, True)
    assert resolve_precision("auto", "cpu", allowed=False, why_not="the DP paths stay float32").name == "fp32"
    out = str(tmp_path)
    dp = ["--dp", "--split", "private", "--target-epsilon", "50"]
    refused(train_teacher, teacher_argv(tiny_data_root, out, *dp, "--precision", "bf16"), capsys, out)
    refused(train_teacher, teacher_argv(tiny_data_root, out, *dp, "--minibatch-std", "4"), capsys, out)
    train_teacher.main(train_teacher.parse_args(teacher_argv(tiny_data_root, out, *dp, "--max-steps", "1",
                                                             "--precision", "auto")))
    assert "teacher: precision fp32 (auto: the DP paths stay float32)" in capsys.readouterr().out


def test_snapshots_are_kept_at_the_chosen_steps_and_survive_a_resume(tiny_data_root, tmp_path, capsys, no_figures):
    def teacher(out, *extra):
        return train_teacher.main(train_teacher.parse_args(teacher_argv(
            tiny_data_root, str(tmp_path / out), "--snapshot-steps", "2", "5", "--checkpoint-every", "3", *extra)))

    straight = teacher("straight", "--max-steps", "6")
    interrupted = teacher("resumed", "--max-steps", "4")
    assert sorted(f for f in os.listdir(interrupted) if f.startswith("snapshot")) == ["snapshot-000002.pt"]
    first = os.path.join(interrupted, "snapshot-000002.pt")
    before = (os.path.getmtime(first), open(first, "rb").read())
    resumed = train_teacher.main(train_teacher.parse_args(["--resume", interrupted, "--max-steps", "6"]))
    assert sorted(f for f in os.listdir(resumed) if f.startswith("snapshot")) == ["snapshot-000002.pt",
                                                                                   "snapshot-000005.pt"]
    assert (os.path.getmtime(first), open(first, "rb").read()) == before  # not rewritten by the resume
    for name, step in (("snapshot-000002.pt", 2), ("snapshot-000005.pt", 5)):
        a, b = (load_checkpoint(os.path.join(run, name), "teacher") for run in (straight, resumed))
        assert a["step"] == b["step"] == step
        assert state_hash(a["generator"]) == state_hash(b["generator"])  # resume-exact
    assert load_checkpoint(resumed)["step"] == 6  # checkpoint.pt and latest stay the run's own
    argv = ["--out", str(tmp_path / "eval"), *tiny_data_args(tiny_data_root), "--device", "cpu",
            "--num-fd-samples", "100", "--num-downstream-samples", "240", "--downstream-epochs", "1",
            "--classifier-epochs", "1", "--audit-samples", "100", "--latency-repeats", "1",
            "--throughput-repeats", "1", "--max-steps", "5", "--precision", "fp32",
            "--runs", os.path.join(resumed, "snapshot-000002.pt"), os.path.join(resumed, "snapshot-000005.pt"),
            resumed]
    rows = json.load(open(os.path.join(evaluate.main(evaluate.parse_args(argv)), "results.json")))["rows"]
    assert [(row["label"], row["step"], row["snapshot"]) for row in rows] == [
        ("teacher@2", 2, 2), ("teacher@5", 5, 5), ("teacher", 6, None)]
    assert len({row["fd"] for row in rows}) == 3


def test_student_keeps_snapshots(tiny_distill_run, tmp_path, no_figures):
    out, distill = tiny_distill_run
    run_dir = train_student.main(train_student.parse_args(student_argv(
        str(tmp_path), distill, "--snapshot-steps", "3", "--precision", "fp32")))
    snapshot = load_checkpoint(os.path.join(run_dir, "snapshot-000003.pt"), "student")
    assert snapshot["step"] == 3 and snapshot["teacher"] == load_checkpoint(run_dir)["teacher"]


def test_fp32_precision_object_changes_nothing():
    G = torch.nn.Linear(2, 2)
    assert FP32.wrap(G) is G and FP32.for_use("teacher") == Precision("fp32", reason="")
    assert not FP32.for_use("teacher").channels_last and Precision("bf16").for_use("teacher").channels_last
