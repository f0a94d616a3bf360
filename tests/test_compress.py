"""Stage 4: compress(student) -> compact is exactly function-preserving, and compress_student.py writes a complete,
honest run (or nothing at all)."""
import json
import os

import pytest
import torch

import compress_student
from conftest import handmade_student, write_handmade_run
from models import Generator
from utils.compression.compress import (MAX_ABS_DIFF, checked_difference, compress, kept_channels, max_abs_difference,
                                        removable_mask)
from utils.compression.deploy import load_artifact
from utils.run.checkpoint import build_generator, load_checkpoint
from utils.run.cli import UserError, run_script

DEAD_PATTERNS = {
    "mixed": ([0, 3, 5], [1, 2], [4]),
    "single-live": ([i for i in range(12) if i != 7], [i for i in range(8) if i != 0], [1, 2, 3, 4, 5]),
    "all-dead-middle": ([2], list(range(8)), [0]),
    "all-dead-last": ([], [3], list(range(6))),
}


def quick_argv(out, *extra):
    return ["--out", out, "--check-samples", "300", "--latency-repeats", "1", "--throughput-repeats", "1",
            "--throughput-batch", "8", "--device", "cpu", *extra]


@pytest.mark.parametrize("bits", [8, 4, 32])
@pytest.mark.parametrize("pattern", list(DEAD_PATTERNS))
def test_compact_equals_student(bits, pattern):
    dead = DEAD_PATTERNS[pattern]
    student = handmade_student(bits=bits, dead=dead, seed=len(pattern) + bits)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    compact = compress(student)
    expected = [max(1, width - len(idx)) for width, idx in zip(student.channels, dead)]
    assert list(compact.channels) == expected
    assert compact.bits == student.bits and type(compact) is Generator
    assert max_abs_difference(student, compact, 2048, seed=3) <= 1e-6
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # pure: student untouched
    # the stored weight scales are sliced, never recomputed
    for name, keep in zip(("block0", "block1", "block2"), kept_channels(student)):
        student_scale = getattr(student, name).conv.weight_scale
        assert torch.equal(getattr(compact, name).conv.weight_scale, student_scale[keep])
    assert torch.equal(compact.to_image.weight_scale, student.to_image.weight_scale)


@pytest.mark.parametrize("bits", [8, 4])
def test_recomputing_scales_would_break_equivalence(bits):
    """The test students hide each output channel's largest weight in a dead input channel: this is what makes
    keeping the stored scales necessary (and the equivalence test above meaningful)."""
    student = handmade_student(bits=bits, dead=DEAD_PATTERNS["mixed"])
    compact = compress(student)
    compact.refresh_quant_scales()
    assert max_abs_difference(student, compact, 512) > 1e-3


def test_all_dead_layer_keeps_one_zero_channel():
    student = handmade_student(dead=DEAD_PATTERNS["all-dead-middle"])
    compact = compress(student)
    assert compact.channels[1] == 1
    assert not compact.block1.norm.alive.any()
    assert compact.block1.norm.weight.item() == 0 and compact.block1.norm.bias.item() == 0
    z, labels = compact.sample_inputs(16)
    with torch.no_grad():
        x = torch.cat([z, compact.embed(labels)], 1)[:, :, None, None]
        assert torch.equal(compact.block1(compact.block0(x)), torch.zeros(16, 1, 14, 14))  # outputs exactly 0
    assert max_abs_difference(student, compact, 512) <= 1e-6


def test_no_dead_channels_keeps_widths_and_state():
    student = handmade_student(dead=((), (), ()))
    compact = compress(student)
    assert compact.channels == student.channels
    state = compact.state_dict()
    assert all(torch.equal(state[k], v) for k, v in student.state_dict().items())


def test_zero_gamma_with_positive_beta_is_kept():
    """gamma = 0 with beta > 0 outputs a constant, not 0: removing it would change the function."""
    student = handmade_student(dead=((), (), ()))
    with torch.no_grad():
        student.block1.norm.weight[3] = 0.0
        student.block1.norm.bias[3] = 0.5
        student.block1.norm.weight[4] = 0.0
        student.block1.norm.bias[4] = -0.5  # ReLU maps it to 0: removable although alive is still True
    assert removable_mask(student)[1].nonzero().flatten().tolist() == [4]
    compact = compress(student)
    assert compact.channels == (12, 7, 6)
    assert max_abs_difference(student, compact, 512) <= 1e-6


def test_nan_difference_is_never_small():
    student = handmade_student()
    broken = compress(student)
    with torch.no_grad():
        broken.to_image.bias.fill_(float("nan"))
    assert max_abs_difference(student, broken, 64) == float("inf")


# ---------------------------------------------------------------- the script

def test_main_end_to_end(handmade_pipeline, capsys):
    out, teacher_run, _, student_run = handmade_pipeline
    run_dir = compress_student.main(compress_student.parse_args(quick_argv(out)))
    assert os.path.realpath(os.path.join(out, "compact", "latest")) == os.path.realpath(run_dir)
    for name in ("checkpoint.pt", "args.json", "metrics.jsonl", "generator_int.pt", "generator.pt2",
                 "generator.onnx", "ort_runner.py", "compression.json", "compression.png", "samples.png"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name

    student_ckpt = load_checkpoint(student_run, "student")
    checkpoint = load_checkpoint(run_dir, "compact")
    assert checkpoint["parent"] == os.path.realpath(student_run)
    assert checkpoint["teacher"] == os.path.realpath(teacher_run)
    assert checkpoint["privacy"] == student_ckpt["privacy"]  # post-processing: ledger unchanged
    assert checkpoint["model_args"]["discriminator"] == student_ckpt["model_args"]["discriminator"]
    assert all(torch.equal(v, student_ckpt["discriminator"][k]) for k, v in checkpoint["discriminator"].items())
    assert {"torch", "opacus", "project"} <= set(checkpoint["versions"])
    compact = build_generator(checkpoint).eval()
    student = build_generator(student_ckpt).eval()
    assert list(compact.channels) == [9, 7, 1]
    assert max_abs_difference(student, compact, 512) <= MAX_ABS_DIFF
    assert max_abs_difference(compact, load_artifact(os.path.join(run_dir, "generator_int.pt")), 256) <= 1e-6

    report = json.load(open(os.path.join(run_dir, "compression.json")))
    assert report["compression"]["widths_before"] == [12, 8, 6]
    assert report["compression"]["widths_after"] == [9, 7, 1]
    assert report["compression"]["max_abs_diff"] <= MAX_ABS_DIFF
    assert report["teacher_source"].startswith("teacher run")
    cost = report["cost"]
    assert set(cost) == {"teacher", "teacher (ONNX Runtime)", "student", "compact (eager)", "compact (ONNX Runtime)"}
    eager, shipped = cost["compact (eager)"], cost["compact (ONNX Runtime)"]
    assert eager["parameters"] < cost["student"]["parameters"] == cost["teacher"]["parameters"]
    assert eager["macs"] < cost["teacher"]["macs"] and shipped["macs"] == eager["macs"]
    assert eager["bytes"] == os.path.getsize(os.path.join(run_dir, "generator_int.pt"))
    assert shipped["bytes"] == os.path.getsize(os.path.join(run_dir, "generator.onnx")) < cost["teacher"]["bytes"] / 2
    assert cost["teacher"]["vs_teacher"]["parameters"] == 1.0
    assert shipped["vs_teacher"]["images_per_s"] == shipped["images_per_s"] / cost["teacher"]["images_per_s"]
    in_runtime = cost["teacher (ONNX Runtime)"]  # the headline: the teacher's own ONNX model, same runtime
    assert shipped["vs_teacher_same_runtime"]["images_per_s"] == shipped["images_per_s"] / in_runtime["images_per_s"]
    assert shipped["vs_teacher_same_runtime"]["bytes"] == shipped["bytes"] / in_runtime["bytes"]
    assert all(row["latency_ms"] > 0 and row["images_per_s"] > 0 for row in cost.values())
    assert report["compression"]["runtime_max_abs_diff"] <= report["compression"]["runtime_tolerance"]
    assert report["compression"]["runtime_exact"] and report["compression"]["runtime_reference_mismatches"] == 0
    assert report["compression"]["runtime_float_layers"] == ["block0", "to_image"]
    assert "float debugging export" in report["compression"]["program_note"]
    printed = capsys.readouterr().out
    assert "compact" in printed and "xT: ratio to the teacher in the same runtime" in printed
    assert "generator.onnx (ONNX Runtime, what ships) against the teacher's float ONNX model" in printed


def test_teacher_found_through_distill_parent(handmade_pipeline, no_figures):
    out, teacher_run, distill_run, _ = handmade_pipeline
    student = handmade_student(dead=([1], [], []))
    student_run = write_handmade_run(out, "student", student, parent=distill_run)  # no `teacher` field
    run_dir = compress_student.main(compress_student.parse_args(quick_argv(out, "--student-dir", student_run)))
    report = json.load(open(os.path.join(run_dir, "compression.json")))
    assert report["teacher_run"] == os.path.realpath(teacher_run)


def test_teacher_fallback_is_stated(tmp_path):
    out = str(tmp_path / "out")
    student = handmade_student(dead=([1], [], []))
    write_handmade_run(out, "student", student, discriminator=False)  # no teacher, no parent, no discriminator
    run_dir = compress_student.main(compress_student.parse_args(quick_argv(out)))
    report = json.load(open(os.path.join(run_dir, "compression.json")))
    assert report["teacher_run"] is None
    assert "no teacher run found" in report["teacher_source"]
    assert report["cost"]["teacher"]["parameters"] == report["cost"]["student"]["parameters"]
    assert "discriminator" not in load_checkpoint(run_dir, "compact")["model_args"]


def test_non_student_checkpoint_is_refused(handmade_pipeline, capsys):
    out, teacher_run, _, _ = handmade_pipeline
    code = run_script(compress_student.main, compress_student.parse_args,
                      quick_argv(out, "--student-dir", teacher_run))
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected student" in err
    assert not os.path.exists(os.path.join(out, "compact"))


def test_missing_student_is_a_clear_error(tmp_path, capsys):
    code = run_script(compress_student.main, compress_student.parse_args, quick_argv(str(tmp_path)))
    assert code == 2
    assert "train_student.py" in capsys.readouterr().err


def test_difference_above_tolerance_refuses_and_writes_nothing(handmade_pipeline, monkeypatch):
    out = handmade_pipeline[0]
    real_compress = compress_student.compress

    def perturbed(student):
        compact = real_compress(student)
        with torch.no_grad():
            compact.to_image.bias.add_(1e-3)
        return compact

    monkeypatch.setattr(compress_student, "compress", perturbed)
    with pytest.raises(UserError, match="refused, nothing written"):
        compress_student.main(compress_student.parse_args(quick_argv(out)))
    assert not os.path.exists(os.path.join(out, "compact"))


class SumOrder(torch.nn.Module):
    """Adds 1e8, 1 and -1e8 in one of two orders: in float32 1e8 + 1 rounds back to 1e8, in float64 it does not
    (what a conv over fewer input channels does to a sum, at a larger scale)."""
    nz, num_classes = 2, 10

    def __init__(self, big_first: bool):
        super().__init__()
        self.embed, self.big_first = torch.nn.Embedding(10, 1), big_first

    def forward(self, z, labels):
        big = torch.full_like(z[:, :1], 1e8)
        return (big + 1) - big if self.big_first else (big - big) + 1


def test_a_float32_summation_order_difference_is_rechecked_in_float64():
    """The guard compares functions, not float32 rounding: a difference that only float32's summation order makes
    is measured again in float64, where it vanishes (a real student did this: 0.0062 in float32, 0 in float64)."""
    a, b = SumOrder(big_first=True), SumOrder(big_first=False)
    assert max_abs_difference(a, b, 64) == 1.0
    assert checked_difference(a, b, 64) == (0.0, "float64")
    assert a.embed.weight.dtype == torch.float32  # the float64 check ran on copies
    student = handmade_student(bits=8, dead=DEAD_PATTERNS[list(DEAD_PATTERNS)[0]], seed=0)
    assert checked_difference(student, compress(student), 256)[1] == "float32"  # the usual case: float32 is enough


# the guarantee (utils/compression/compress.py, README): the compact generator equals the student to 1e-5 in eval mode
COMPACT_GUARANTEE = 1e-5


def test_a_difference_just_above_the_tolerance_is_refused(handmade_pipeline, monkeypatch):
    """The guard itself, not only a gross failure: a compact model off by 1-2x the guaranteed 1e-5 is refused."""
    out = handmade_pipeline[0]
    real_compress, measured = compress_student.compress, []

    def slightly_off(student):
        compact = real_compress(student)
        with torch.no_grad():
            compact.to_image.bias.add_(1.6 * COMPACT_GUARANTEE)
        measured.append(max_abs_difference(student, compact, 300, seed=0))  # what the guard measures
        return compact

    monkeypatch.setattr(compress_student, "compress", slightly_off)
    with pytest.raises(UserError, match="refused, nothing written"):
        compress_student.main(compress_student.parse_args(quick_argv(out)))
    assert COMPACT_GUARANTEE < measured[0] < 2 * COMPACT_GUARANTEE
    assert not os.path.exists(os.path.join(out, "compact"))


def test_dry_run_writes_nothing(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert compress_student.main(compress_student.parse_args(quick_argv(out, "--dry-run"))) is None
    assert '"check_samples": 300' in capsys.readouterr().out
    assert not os.path.exists(out)


def test_compresses_a_trained_tiny_student(tiny_student_run, tmp_path, no_figures):
    """The real stage-3 output (a 4-step student whose large rho killed channels) goes through stage 4."""
    _, student_run = tiny_student_run
    out = str(tmp_path / "out")
    run_dir = compress_student.main(compress_student.parse_args(quick_argv(out, "--student-dir", student_run)))
    student_ckpt = load_checkpoint(student_run, "student")
    checkpoint = load_checkpoint(run_dir, "compact")
    student = build_generator(student_ckpt)
    assert list(checkpoint["model_args"]["generator"]["channels"]) == student.active_channels()
    assert checkpoint["privacy"] == student_ckpt["privacy"]
    report = json.load(open(os.path.join(run_dir, "compression.json")))
    assert report["compression"]["max_abs_diff"] <= MAX_ABS_DIFF
    assert report["teacher_run"] is not None
