"""Bad input, killed runs and numerical failure (issue 7): one clear line and exit 2, nothing on disk changed;
SIGKILL + --resume equals an uninterrupted run; NaN stops the run and keeps the last good checkpoint."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import compress_student
import create_dataset
import evaluate
import fine_tune
import train_student
import train_teacher
from conftest import ROOT, teacher_argv
from utils.checkpoint import load_checkpoint
from utils.cli import run_script

SCRIPTS = {"teacher": train_teacher, "distill": create_dataset, "student": train_student,
           "compact": compress_student, "private": fine_tune, "eval": evaluate}
# the flag through which each script reads the previous stage's run
INPUT_FLAG = {"teacher": "--resume", "distill": "--teacher-dir", "student": "--distill-dir",
              "compact": "--student-dir", "private": "--generator-dir", "eval": "--runs"}
WRONG_STAGE = {"teacher": "student", "distill": "student", "student": "teacher", "compact": "teacher",
               "private": "teacher"}


def snapshot(root):
    """Every file under root with its size and modification time."""
    found = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            stat = os.lstat(path)
            found[path] = (stat.st_size, stat.st_mtime_ns)
    return found


def refused(script, argv, capsys, out):
    """Run a script as its __main__ would; assert exit 2, one line on stderr, no traceback, nothing changed."""
    before = snapshot(out)
    try:
        code = run_script(script.main, script.parse_args, argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("WARNING")]
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert snapshot(out) == before
    return err[0]


@pytest.fixture(scope="module")
def pipeline_copy(tiny_student_run, tmp_path_factory):
    """A private copy of the tiny pipeline (teacher, distill, student) plus bad files to feed the scripts."""
    out = str(tmp_path_factory.mktemp("bad-input") / "out")
    shutil.copytree(tiny_student_run[0], out, symlinks=True)
    bad = os.path.join(out, "bad")
    os.makedirs(os.path.join(bad, "empty"))
    os.makedirs(os.path.join(bad, "truncated"))
    data = open(os.path.join(out, "teacher", "latest", "checkpoint.pt"), "rb").read()
    open(os.path.join(bad, "truncated", "checkpoint.pt"), "wb").write(data[: len(data) // 3])
    compress_student.main(compress_student.parse_args(
        ["--out", out, "--check-samples", "64", "--latency-repeats", "1", "--throughput-repeats", "1",
         "--throughput-batch", "8"]))
    os.makedirs(os.path.join(bad, "pickled"))
    torch.save({"stage": "teacher", "payload": Exploit()}, os.path.join(bad, "pickled", "checkpoint.pt"))
    return out


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))


@pytest.mark.parametrize("stage", sorted(INPUT_FLAG))
@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "pickled", "wrong-stage"])
def test_bad_input_paths(stage, case, pipeline_copy, capsys, tiny_data_root):
    if case == "wrong-stage" and stage not in WRONG_STAGE:
        pytest.skip("evaluate.py accepts any generator stage")
    out = pipeline_copy
    path = {"missing": os.path.join(out, "nowhere"), "empty": os.path.join(out, "bad", "empty"),
            "truncated": os.path.join(out, "bad", "truncated"), "pickled": os.path.join(out, "bad", "pickled"),
            "wrong-stage": os.path.join(out, WRONG_STAGE.get(stage, ""), "latest")}[case]
    argv = ["--out", out, INPUT_FLAG[stage], path, "--device", "cpu"]
    if stage in ("teacher", "private", "eval"):  # the scripts that read the dataset
        argv += ["--data-root", tiny_data_root, "--public-size", "200"]
    message = refused(SCRIPTS[stage], argv, capsys, out)
    expected = {"missing": "no such file", "empty": "no checkpoint.pt", "truncated": "corrupt or truncated",
                "pickled": "never run code", "wrong-stage": "checkpoint, expected"}[case]
    assert expected in message
    assert not os.path.exists("exploited")


@pytest.mark.parametrize("stage,argv,expected", [
    ("teacher", ["--epochs", "0"], "positive integer"),
    ("teacher", ["--batch-size", "-3"], "positive integer"),
    ("teacher", ["--public-size", "100000"], "--public-size"),
    ("student", ["--rho", "-0.1"], "non-negative"),
    ("student", ["--quant-bits", "9"], "bit width"),
    ("student", ["--quant-bits", "1"], "bit width"),
    ("student", ["--epochs", "0"], "positive integer"),
    ("private", ["--target-epsilon", "0"], "positive number"),
    ("private", ["--delta", "1.5"], "(0, 1)"),
    ("private", ["--delta", "0"], "(0, 1)"),
    ("private", ["--batch-size", "0"], "positive integer"),
    ("private", ["--delta", "0.5"], "below 1/N"),
    ("distill", ["--num-samples", "0"], "positive integer"),
])
def test_nonsense_numbers(stage, argv, expected, pipeline_copy, capsys, tiny_data_root):
    extra = ["--data-root", tiny_data_root, "--public-size", "200"] if stage in ("teacher", "private") else []
    if stage == "teacher":
        extra += ["--g-channels", "4", "4", "4", "--d-channels", "4", "4"]
    if "--public-size" in argv:
        extra = extra[:2]
    message = refused(SCRIPTS[stage], ["--out", pipeline_copy, "--device", "cpu", *extra, *argv], capsys,
                      pipeline_copy)
    assert expected in message


def test_missing_dataset(pipeline_copy, capsys, tmp_path, monkeypatch):
    from utils import data
    monkeypatch.setitem(data.DATASETS["fashion-mnist"], "debian", str(tmp_path / "nowhere"))
    monkeypatch.setattr(data, "_torchvision_download", lambda *args: None)
    os.makedirs(tmp_path / "empty-root")
    message = refused(train_teacher, ["--out", pipeline_copy, "--data-root", str(tmp_path / "empty-root")], capsys,
                      pipeline_copy)
    assert "not found" in message and "dataset-fashion-mnist" in message


def test_distill_set_that_does_not_match_its_teacher(pipeline_copy, capsys, tiny_data_root, tmp_path):
    other = train_teacher.main(train_teacher.parse_args(teacher_argv(tiny_data_root, str(tmp_path), "--nz", "7")))
    capsys.readouterr()
    message = refused(train_student, ["--out", pipeline_copy, "--distill-dir",
                                      os.path.join(pipeline_copy, "distill", "latest"), "--teacher-dir", other],
                      capsys, pipeline_copy)
    assert "does not match the distillation set" in message


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data_root, tmp_path, monkeypatch, capsys):
    from utils import gan
    real_step, calls = gan.nonprivate_discriminator_step, []

    def failing_step(*args):
        calls.append(1)
        return float("nan") if len(calls) == 5 else real_step(*args)

    monkeypatch.setattr(gan, "nonprivate_discriminator_step", failing_step)
    argv = teacher_argv(tiny_data_root, str(tmp_path), "--max-steps", "8", "--checkpoint-every", "2")
    assert run_script(train_teacher.main, train_teacher.parse_args, argv) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at step 5" in err and "Traceback" not in err
    checkpoint = load_checkpoint(os.path.join(str(tmp_path), "teacher", "latest"), "teacher")
    assert checkpoint["step"] == 4
    assert all(torch.isfinite(v).all() for v in checkpoint["generator"].values() if v.is_floating_point())


def wait_for_step(run_root, minimum, process, timeout=120):
    latest = os.path.join(run_root, "teacher", "latest")
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if os.path.exists(latest):
            try:
                if load_checkpoint(latest)["step"] >= minimum:
                    return
            except Exception:  # noqa: BLE001 - mid-write reads are retried; the final load below is strict
                pass
        time.sleep(0.05)
    raise AssertionError("the training process never reached the step to kill it at")


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_data_root, tmp_path):
    argv = teacher_argv(tiny_data_root, str(tmp_path / "killed"), "--max-steps", "60", "--checkpoint-every", "1",
                        "--log-every", "1", "--epochs", "10")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "train_teacher.py", *argv], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(str(tmp_path / "killed"), 10, process)
        process.send_signal(signal.SIGKILL)  # at an arbitrary point, possibly mid-write
    finally:
        process.wait()
    killed_at = load_checkpoint(os.path.join(str(tmp_path / "killed"), "teacher", "latest"))["step"]
    assert 10 <= killed_at < 60
    resumed = train_teacher.main(train_teacher.parse_args(["--out", str(tmp_path / "killed"), "--resume"]))
    straight = train_teacher.main(train_teacher.parse_args(
        teacher_argv(tiny_data_root, str(tmp_path / "straight"), "--max-steps", "60", "--log-every", "1",
                     "--epochs", "10")))
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a["step"] == b["step"] == 60
    for key in a["generator"]:
        assert torch.allclose(a["generator"][key].float(), b["generator"][key].float(), atol=1e-6), key
    for key in a["discriminator"]:
        assert torch.allclose(a["discriminator"][key], b["discriminator"][key], atol=1e-6), key
    assert a["privacy"] == b["privacy"]
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in open(os.path.join(resumed, "metrics.jsonl"))]
    assert steps == list(range(1, 61))
    leftovers = [name for name in os.listdir(resumed) if ".tmp." in name]
    assert leftovers == [] or all(name.startswith("checkpoint.pt.tmp.") for name in leftovers)
