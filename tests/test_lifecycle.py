"""The run life cycle and the checkpoint layout (issue 10): paths stored relative to the pipeline root so that a
pipeline directory moves whole, `lineage`, `latest` only at complete runs, editable input constants, quiet
progress in log files; --once (issue 27): a finished run of the same settings and inputs is skipped, any other is
not, and an unfinished one with nothing to resume is started again in its place."""
import io
import json
import os
import shutil
import sys

import pytest
import torch

import compress_student
import create_dataset
import evaluate
import train_teacher
from conftest import distill_argv, handmade_student, teacher_argv, write_handmade_run
from test_compress import quick_argv
from test_evaluate import eval_argv, make_fake_compact_run
from test_reliability import snapshot
from utils.gan.steps import NonPrivateStep
from utils.run.checkpoint import CHECKPOINT_NAME, lineage, load_checkpoint, mark_latest
from utils.run.cli import LOG_INTERVAL_S, progress_bar, run_script
from utils.run.lifecycle import Run
from utils.run.once import PROGRESS_NAME
from utils.run.trainer import Trainer


def test_paths_are_stored_relative_and_a_moved_pipeline_resolves(handmade_pipeline, tmp_path):
    out, teacher_run, distill_run, student_run = handmade_pipeline
    raw = torch.load(os.path.join(student_run, CHECKPOINT_NAME), weights_only=True)
    assert raw["parent"] == os.path.join("distill", os.path.basename(distill_run))
    assert raw["teacher"] == os.path.join("teacher", os.path.basename(teacher_run))
    moved = str(tmp_path / "moved")
    shutil.move(out, moved)
    student = load_checkpoint(os.path.join(moved, "student", "latest"), "student")
    assert student["parent"] == os.path.realpath(os.path.join(moved, "distill", os.path.basename(distill_run)))
    runs = lineage(student)
    assert runs == {stage: os.path.realpath(os.path.join(moved, stage, os.path.basename(run)))
                    for stage, run in (("teacher", teacher_run), ("distill", distill_run), ("student", student_run))}


def test_lineage_of_a_compact_run_follows_its_parents(handmade_pipeline):
    out, teacher_run, distill_run, student_run = handmade_pipeline
    compact_run = write_handmade_run(out, "compact", handmade_student(), parent=student_run)  # names no teacher
    runs = lineage(load_checkpoint(compact_run, "compact"))
    assert runs == {"teacher": os.path.realpath(teacher_run), "distill": os.path.realpath(distill_run),
                    "student": os.path.realpath(student_run)}


def test_editable_constant_replaces_the_default_and_the_flag_wins(handmade_pipeline, tmp_path, monkeypatch,
                                                                 capsys, no_figures):
    _, teacher_run, _, student_run = handmade_pipeline
    with pytest.raises(SystemExit):
        compress_student.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "STUDENT_DIR at the top of this script" in help_text and "this flag wins" in help_text
    monkeypatch.setattr(compress_student, "STUDENT_DIR", student_run)
    out = str(tmp_path / "elsewhere")  # holds no student: the constant names it
    run_dir = compress_student.main(compress_student.parse_args(quick_argv(out)))
    assert load_checkpoint(run_dir, "compact")["parent"] == os.path.realpath(student_run)
    with pytest.raises(Exception, match="expected student"):  # the flag wins over the constant
        compress_student.main(compress_student.parse_args(quick_argv(out, "--student-dir", teacher_run)))


def test_evaluation_moves_latest_only_once_complete(tiny_data_root, tiny_teacher_run, tmp_path, monkeypatch):
    out = str(tmp_path)
    argv = eval_argv(tiny_data_root, out, "--runs", tiny_teacher_run[1])

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(evaluate, "plot_tradeoff", broken)
    with pytest.raises(RuntimeError):
        evaluate.main(evaluate.parse_args(argv))
    assert not os.path.lexists(os.path.join(out, "eval", "latest"))
    monkeypatch.undo()
    run_dir = evaluate.main(evaluate.parse_args(argv))
    checkpoint = load_checkpoint(os.path.join(out, "eval", "latest"), "eval")
    assert checkpoint["run_dir"] == os.path.realpath(run_dir)
    assert checkpoint["runs"] == [os.path.realpath(tiny_teacher_run[1])]


def test_progress_reports_slowly_when_output_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, not a terminal
    bar = progress_bar(total=3)
    assert bar.mininterval == LOG_INTERVAL_S >= 30
    bar.close()


def test_training_log_is_short_when_output_is_a_file(tiny_data_root, tmp_path, capfd):
    argv = teacher_argv(tiny_data_root, str(tmp_path), "--max-steps", "8", "--log-every", "1")
    train_teacher.main(train_teacher.parse_args(argv))
    err = capfd.readouterr().err
    assert err.count("teacher:") <= 3, err  # the first report and the last, not one per step


# ---------------------------------------------------------------- --once (the make-driven chain: test_make_resume.py)

def run_once(script, argv) -> int:
    """Run a script as its __main__ would, with --once."""
    return run_script(script.main, script.parse_args, [*argv, "--once"])


def runs_of(out, stage) -> list:
    return sorted(name for name in os.listdir(os.path.join(out, stage)) if name != "latest")


def latest_of(out, stage) -> str:
    return os.path.realpath(os.path.join(out, stage, "latest"))


def test_once_skips_a_run_finished_with_the_same_settings_and_no_other(tiny_data_root, tmp_path, capsys):
    out = str(tmp_path)
    argv = teacher_argv(tiny_data_root, out)
    assert run_once(train_teacher, argv) == 0
    first = latest_of(out, "teacher")
    before = snapshot(out)
    assert run_once(train_teacher, argv) == 0
    assert "teacher: skipped:" in capsys.readouterr().out
    assert snapshot(out) == before  # a second run changes nothing
    assert run_once(train_teacher, [*argv, "--max-steps", "2"]) == 0  # other settings: a run of its own
    assert "skipped" not in capsys.readouterr().out
    assert len(runs_of(out, "teacher")) == 2 and latest_of(out, "teacher") != first
    assert run_once(train_teacher, argv) == 0  # the first settings again: that run, and `latest` back at it
    assert len(runs_of(out, "teacher")) == 2 and latest_of(out, "teacher") == first


def test_once_continues_an_interrupted_run_to_the_uninterrupted_result(tiny_data_root, tmp_path, monkeypatch, capsys):
    out, straight = str(tmp_path / "continued"), str(tmp_path / "straight")
    argv = ["--max-steps", "4", "--checkpoint-every", "2", "--log-every", "1", "--pipeline-stage", "1/6"]
    trained = NonPrivateStep.optimize_parameters

    def interrupted_at_3(step, batch, number):
        if number == 3:
            raise KeyboardInterrupt
        return trained(step, batch, number)

    monkeypatch.setattr(NonPrivateStep, "optimize_parameters", interrupted_at_3)
    assert run_once(train_teacher, teacher_argv(tiny_data_root, out, *argv)) == 130
    monkeypatch.undo()
    run_dir = latest_of(out, "teacher")
    early = open(os.path.join(run_dir, "metrics.jsonl")).readlines()[:2]
    open(os.path.join(run_dir, "checkpoint.pt.tmp.99999"), "w").close()  # writes the kill cut short
    os.symlink(os.path.basename(run_dir), os.path.join(out, "teacher", ".latest.99999"))
    capsys.readouterr()
    assert run_once(train_teacher, teacher_argv(tiny_data_root, out, *argv)) == 0
    output = capsys.readouterr().out
    assert f"teacher: continuing {run_dir}" in output
    assert "== stage 1/6 train_teacher.py: started" in output and "== stage 1/6 train_teacher.py: done in" in output
    assert runs_of(out, "teacher") == [os.path.basename(run_dir)] and latest_of(out, "teacher") == run_dir
    assert open(os.path.join(run_dir, "metrics.jsonl")).readlines()[:2] == early  # continued, not started again
    assert not [name for name in os.listdir(run_dir) if ".tmp." in name]
    assert sorted(os.listdir(os.path.join(out, "teacher"))) == [os.path.basename(run_dir), "latest"]
    assert run_once(train_teacher, teacher_argv(tiny_data_root, straight, *argv)) == 0
    a, b = load_checkpoint(run_dir), load_checkpoint(os.path.join(straight, "teacher", "latest"))
    assert a["step"] == b["step"] == 4
    for name in ("generator", "discriminator"):
        assert all(torch.equal(a[name][key], b[name][key]) for key in a[name]), name


def test_once_runs_a_stage_again_when_the_run_it_reads_is_no_longer_the_latest(handmade_pipeline, capsys,
                                                                                 no_figures, monkeypatch):
    out, teacher_run, distill_run, student_run = handmade_pipeline
    assert run_once(compress_student, quick_argv(out)) == 0
    first = latest_of(out, "compact")
    assert run_once(compress_student, quick_argv(out)) == 0 and runs_of(out, "compact") == [os.path.basename(first)]
    write_handmade_run(out, "student", handmade_student(seed=1), parent=distill_run, teacher=teacher_run)
    assert run_once(compress_student, quick_argv(out)) == 0  # the same flags, another student: compressed anew
    assert len(runs_of(out, "compact")) == 2 and latest_of(out, "compact") != first
    mark_latest(student_run)  # the first student again: its compact run is the one
    capsys.readouterr()
    with monkeypatch.context() as patched:  # skipped before it compresses anything (it took 24 s at full size)
        patched.setattr(compress_student, "compress_checked", None)
        assert run_once(compress_student, quick_argv(out)) == 0
    assert "compact: skipped:" in capsys.readouterr().out
    assert len(runs_of(out, "compact")) == 2 and latest_of(out, "compact") == first


def test_once_starts_again_in_place_of_a_run_that_left_nothing_to_resume(tiny_data_root, tmp_path, monkeypatch):
    out = str(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)  # killed before its first checkpoint
    assert run_once(train_teacher, teacher_argv(tiny_data_root, out)) == 130
    killed = runs_of(out, "teacher")
    monkeypatch.undo()
    assert run_once(train_teacher, teacher_argv(tiny_data_root, out)) == 0
    assert runs_of(out, "teacher") == killed  # started again in its place: no second run directory
    assert os.path.exists(os.path.join(out, "teacher", killed[0], "finished.json"))
    monkeypatch.setattr(create_dataset, "save_grid", interrupted)  # a distillation set killed while written...
    monkeypatch.setattr(Run, "discard", lambda run: None)  # ...by SIGKILL: its hidden directory stays
    assert run_once(create_dataset, distill_argv(out)) == 130
    assert [name for name in os.listdir(os.path.join(out, "distill")) if name.startswith(".partial-")]
    monkeypatch.undo()
    assert run_once(create_dataset, distill_argv(out)) == 0
    assert sorted(os.listdir(os.path.join(out, "distill"))) == ["00000-n200", "latest"]  # no hidden leftover


ROW_FIELDS = ("label", "step", "fd", "precision", "recall", "downstream_accuracy", "mia_auc", "epsilon", "parameters",
              "bytes")


def test_once_continues_a_killed_evaluation_with_its_next_generator(tiny_data_root, tiny_teacher_run, tmp_path,
                                                                     monkeypatch, capsys, no_figures):
    compact = make_fake_compact_run(tiny_teacher_run[1], str(tmp_path / "runs"))
    out, straight = str(tmp_path / "continued"), str(tmp_path / "straight")
    argv = lambda root: eval_argv(tiny_data_root, root, "--runs", tiny_teacher_run[1], compact)  # noqa: E731
    measure, measured = evaluate.evaluate_run, []

    def killed_at_the_second(checkpoint, *args):
        if measured:
            raise KeyboardInterrupt
        measured.append(checkpoint["label"])
        return measure(checkpoint, *args)

    monkeypatch.setattr(evaluate, "evaluate_run", killed_at_the_second)
    assert run_once(evaluate, argv(out)) == 130
    assert not os.path.lexists(os.path.join(out, "eval", "latest"))  # `latest` only at a complete evaluation
    (killed,) = runs_of(out, "eval")
    progress = json.load(open(os.path.join(out, "eval", killed, PROGRESS_NAME)))
    assert [row["label"] for row in progress["rows"]] == ["teacher"]
    monkeypatch.setattr(evaluate, "evaluate_run", lambda checkpoint, *args: measured.append(checkpoint["label"])
                        or measure(checkpoint, *args))
    capsys.readouterr()
    assert run_once(evaluate, argv(out)) == 0
    output = capsys.readouterr().out
    assert f"eval: continuing {os.path.join(out, 'eval', killed)}" in output
    assert "eval: 1/2 teacher: measured before" in output
    assert "eval: 2/2 compact measured, " in output
    assert measured == ["teacher", "compact"]  # the teacher was not measured again
    assert runs_of(out, "eval") == [killed] and latest_of(out, "eval") == os.path.realpath(os.path.join(out, "eval",
                                                                                                          killed))
    assert not os.path.exists(os.path.join(out, "eval", killed, PROGRESS_NAME))
    assert os.path.exists(os.path.join(out, "eval", killed, "finished.json"))
    assert run_once(evaluate, argv(straight)) == 0
    rows = [json.load(open(os.path.join(root, "eval", "latest", "results.json")))["rows"] for root in (out, straight)]
    same = [[[row[key] for key in ROW_FIELDS] for row in rows_of_out] for rows_of_out in rows]
    assert same[0] == same[1]
    assert "| teacher |" in open(os.path.join(out, "eval", "latest", "results.md")).read()  # the kept row renders


def test_a_continued_evaluation_measures_a_run_again_that_moved_on(tmp_path, monkeypatch, capsys):
    runs = [{"run_dir": "/runs/teacher", "step": 8, "label": "teacher"},
            {"run_dir": "/runs/compact", "step": 3, "label": "compact"},
            {"run_dir": "/runs/private", "step": 5, "label": "private"}]
    before = [{"run_dir": "/runs/teacher", "step": 6, "label": "teacher", "fd": 1.0},  # trained on since
              {"run_dir": "/runs/compact", "step": 3, "label": "compact#1", "fd": 2.0}]
    monkeypatch.setattr(evaluate, "evaluate_run", lambda checkpoint, *args: {**checkpoint, "fd": 9.0})
    clock = iter(range(0, 6000, 60))  # a minute per reading of the clock
    monkeypatch.setattr(evaluate.time, "time", lambda: next(clock))
    rows = evaluate.evaluate_runs(runs, {}, None, "cpu", Run(str(tmp_path), "eval"), before)
    monkeypatch.undo()
    assert [(row["label"], row["step"], row["fd"]) for row in rows] == [("teacher", 8, 9.0), ("compact", 3, 2.0),
                                                                        ("private", 5, 9.0)]
    assert json.load(open(tmp_path / PROGRESS_NAME))["rows"] == rows
    output = capsys.readouterr().out
    # the time left counts the runs still to measure (private), not the kept one (compact)
    assert "eval: 1/3 teacher measured, 2 min 00 s so far, about 1 min 00 s left" in output
    assert "eval: 2/3 compact: measured before the interruption, kept" in output
    assert "eval: 3/3 private measured" in output and output.count("measured,") == 2
