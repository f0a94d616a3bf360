"""benchmarks/learning_curve.py: every snapshot of a run is measured once, the published protocol only where asked,
and an interrupted curve continues where it stopped."""
import json
import os
import sys

import torch

import evaluate
import train_student
import train_teacher
from conftest import ROOT, student_argv, teacher_argv, tiny_data_args

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import learning_curve  # noqa: E402


def curve_argv(run_dir, tmp_path, data_root, *extra):
    tiny = [*tiny_data_args(data_root), "--num-downstream-samples", "240", "--downstream-epochs", "1",
            "--audit-samples", "100", "--audit-members", "20", "--latency-repeats", "1", "--throughput-repeats", "1",
            "--max-steps", "5"]
    return ["--run", run_dir, "--name", "curve", "--out", str(tmp_path / "eval"), "--results-dir",
            str(tmp_path / "results"), "--fd-samples", "100", "--classifier-epochs", "1", "--precision", "fp32",
            "--eval-args", " ".join(tiny), *extra]


def counting_evaluations(monkeypatch) -> list:
    calls, original = [], evaluate.main

    def counted(args):
        calls.append((args.runs[0], args.quick))
        return original(args)
    monkeypatch.setattr(evaluate, "main", counted)
    return calls


def test_teacher_curve_measures_each_snapshot_once(tiny_data_root, tmp_path, monkeypatch):
    run_dir = train_teacher.main(train_teacher.parse_args(teacher_argv(
        tiny_data_root, str(tmp_path / "run"), "--max-steps", "5", "--snapshot-steps", "2", "4")))
    calls = counting_evaluations(monkeypatch)
    state = learning_curve.main(learning_curve.parse_args(curve_argv(run_dir, tmp_path, tiny_data_root)))
    assert sorted(state["rows"], key=int) == ["2", "4", "5"]
    assert [quick for _, quick in calls] == [True, True, True, False]  # the published protocol at the last only
    assert calls[-1][0] == os.path.join(run_dir, "checkpoint.pt")
    assert 0 < state["ceiling"]["test_accuracy"] <= 1
    table = open(tmp_path / "results" / "curve.md").read()
    assert table.count("\n| 2 |") + table.count("\n| 4 |") + table.count("\n| 5 |") == 3
    assert os.path.getsize(tmp_path / "results" / "curve.png") > 0
    learning_curve.main(learning_curve.parse_args(curve_argv(run_dir, tmp_path, tiny_data_root,
                                                             "--published-steps", "2", "last")))
    assert len(calls) == 5 and calls[-1] == (os.path.join(run_dir, "snapshot-000002.pt"), False)  # only what was missing
    saved = json.load(open(tmp_path / "eval" / "curve.json"))
    assert {"quick", "published"} <= set(saved["rows"]["2"]) and "published" not in saved["rows"]["4"]


def test_student_curve_has_the_distillation_loss(tiny_distill_run, tiny_data_root, tmp_path, no_figures):
    _, distill = tiny_distill_run
    run_dir = train_student.main(train_student.parse_args(student_argv(
        str(tmp_path / "run"), distill, "--snapshot-steps", "2", "--precision", "fp32")))
    state = learning_curve.main(learning_curve.parse_args(curve_argv(run_dir, tmp_path, tiny_data_root,
                                                                     "--published-steps")))
    losses = [state["rows"][step]["distill_loss"] for step in ("2", "4")]
    assert all(loss > 0 for loss in losses) and losses[0] != losses[1]
    assert "distillation L1" in open(tmp_path / "results" / "curve.md").read()


def test_a_run_short_of_its_stop_gives_its_snapshots_only(tiny_data_root, tmp_path):
    run_dir = train_teacher.main(train_teacher.parse_args(teacher_argv(
        tiny_data_root, str(tmp_path / "run"), "--max-steps", "3", "--snapshot-steps", "2")))
    assert list(learning_curve.checkpoints_of(run_dir)) == [2, 3]
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    state = torch.load(checkpoint, weights_only=True)
    state["args"]["max_steps"] = 10  # as if it were killed at step 3 of 10
    torch.save(state, checkpoint)
    assert list(learning_curve.checkpoints_of(run_dir)) == [2]
