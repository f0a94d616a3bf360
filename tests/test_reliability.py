"""Bad input, killed runs and numerical failure (issue 7): one clear line and exit 2, nothing on disk changed;
SIGKILL + --resume equals an uninterrupted run; NaN stops the run and keeps the last good checkpoint."""
import os
import shutil
import signal
import time

import pytest
import torch

import compress_student
import create_dataset
import evaluate
import fine_tune
import forked
import train_student
import train_teacher
from conftest import teacher_argv
from utils.run.checkpoint import load_checkpoint, read_metrics
from utils.run.cli import run_script

SCRIPTS = {"teacher": train_teacher, "distill": create_dataset, "student": train_student,
           "compact": compress_student, "private": fine_tune, "eval": evaluate}
# the flag through which each script reads the previous stage's run
INPUT_FLAG = {"teacher": "--resume", "distill": "--teacher-dir", "student": "--distill-dir",
              "compact": "--student-dir", "private": "--generator-dir", "eval": "--runs"}
WRONG_STAGE = {"teacher": "student", "distill": "student", "student": "teacher", "compact": "teacher",
               "private": "teacher"}


def snapshot(root):
    """Every file, directory and link under root: a file's size and modification time, a link's target. An empty
    run directory or a moved `latest` left behind by a refusal is a change."""
    found = {}
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories + files:
            path = os.path.join(directory, name)
            stat = os.lstat(path)
            if os.path.islink(path):
                found[path] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                found[path] = ("directory",)
            else:
                found[path] = ("file", stat.st_size, stat.st_mtime_ns)
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
    from utils.data import datasets as data
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
    from utils.gan import steps as gan
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


def killed_teacher_run(argv, out, step, log_path):
    """`python train_teacher.py argv` (forked: tests/forked.py) killed by SIGKILL once it has checkpointed `step`."""
    process = forked.run_stages([("train_teacher", argv)], log_path)
    try:
        wait_for_step(out, step, process)
        os.kill(process.pid, signal.SIGKILL)  # at an arbitrary point, possibly mid-write
    finally:
        process.wait(timeout=120)


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_data_root, tmp_path, no_figures):
    argv = teacher_argv(tiny_data_root, str(tmp_path / "killed"), "--max-steps", "60", "--checkpoint-every", "1",
                        "--log-every", "1", "--epochs", "10")
    killed_teacher_run(argv, str(tmp_path / "killed"), 10, str(tmp_path / "killed.log"))
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


def test_snapshot_sees_an_empty_directory_and_a_moved_link(tmp_path):
    (tmp_path / "teacher" / "00000-a").mkdir(parents=True)
    before = snapshot(str(tmp_path))
    (tmp_path / "teacher" / "00001-b").mkdir()
    assert snapshot(str(tmp_path)) != before
    os.symlink("00000-a", tmp_path / "teacher" / "latest")
    linked = snapshot(str(tmp_path))
    os.replace(tmp_path / "teacher" / "latest", tmp_path / "teacher" / "moved")
    os.symlink("00001-b", tmp_path / "teacher" / "latest")
    os.remove(tmp_path / "teacher" / "moved")
    assert snapshot(str(tmp_path)) != linked


# ---------------------------------------------------------------- refusals of evaluate.py and of --resume

@pytest.mark.parametrize("argv,expected", [
    (["--delta", "0.5"], "below 1/N"),
    (["--public-size", "300"], "is not the one this model's ledger covers"),
])
def test_evaluate_refuses_delta_and_partition_before_writing(argv, expected, pipeline_copy, capsys,
                                                             tiny_data_root):
    runs = os.path.join(pipeline_copy, "compact", "latest")
    base = ["--out", pipeline_copy, "--runs", runs, "--device", "cpu", "--data-root", tiny_data_root,
            "--public-size", "200", "--quick"]
    assert expected in refused(evaluate, base + argv, capsys, pipeline_copy)
    assert not os.path.exists(os.path.join(pipeline_copy, "eval"))


def dp_teacher_argv(data_root, out, *extra):
    """A tiny --dp teacher on the private split: batch 32 of 400 (12 D steps an epoch), sigma 1, RDP."""
    return teacher_argv(data_root, out, "--dp", "--split", "private", "--accountant", "rdp", "--noise-multiplier",
                        "1.0", "--batch-size", "32", "--log-every", "1", *extra)


@pytest.mark.parametrize("stage", ["private", "teacher-dp"])
def test_resume_with_the_dataset_gone_changes_nothing(stage, pipeline_copy, capsys, tiny_data_root, tmp_path,
                                                      monkeypatch):
    """--resume is refused (exit 2, one line) before the run's metrics are cut back or anything else is written."""
    from utils.data import datasets as data
    data_root = shutil.copytree(tiny_data_root, str(tmp_path / "data"))
    out = str(tmp_path / "out")
    script = fine_tune if stage == "private" else train_teacher
    if stage == "private":
        monkeypatch.setattr(fine_tune, "write_device_artifacts", lambda run_dir, G: {})
        fine_tune.main(fine_tune.parse_args(
            ["--out", out, "--generator-dir", os.path.join(pipeline_copy, "compact", "latest"), "--data-root",
             data_root, "--public-size", "200", "--batch-size", "32", "--noise-multiplier", "1.0",
             "--accountant", "rdp", "--max-steps", "3", "--log-every", "1", "--device", "cpu"]))
    else:
        train_teacher.main(train_teacher.parse_args(dp_teacher_argv(data_root, out)))
    run_dir = os.path.realpath(os.path.join(out, script.STAGE, "latest"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as handle:  # as if killed after logging step 4
        handle.write('{"step": 4, "d_loss": 1.0}\n')
    shutil.rmtree(data_root)
    monkeypatch.setitem(data.DATASETS["fashion-mnist"], "debian", str(tmp_path / "nowhere"))
    monkeypatch.setattr(data, "_torchvision_download", lambda *args: None)
    capsys.readouterr()
    message = refused(script, ["--out", out, "--resume", "--max-steps", "6"], capsys, out)
    assert "not found" in message


# ---------------------------------------------------------------- atomic checkpoints

def save_failing_at(monkeypatch, failing_call: int):
    """torch.save writes half of its bytes and raises on its `failing_call`-th call (a full disk, a kill)."""
    import io
    real_save, calls = torch.save, []

    def save(obj, handle, *args, **kwargs):
        calls.append(1)
        if len(calls) != failing_call:
            return real_save(obj, handle, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        handle.flush()
        raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(torch, "save", save)


def test_a_failed_save_keeps_the_previous_checkpoint_and_latest(tiny_data_root, tmp_path, monkeypatch):
    out = str(tmp_path)
    first = train_teacher.main(train_teacher.parse_args(teacher_argv(tiny_data_root, out, "--checkpoint-every", "1")))
    latest = os.path.join(out, "teacher", "latest")
    saved = open(os.path.join(first, "checkpoint.pt"), "rb").read()
    save_failing_at(monkeypatch, 1)  # a new run's first checkpoint fails
    with pytest.raises(OSError, match="simulated"):
        train_teacher.main(train_teacher.parse_args(teacher_argv(tiny_data_root, out)))
    assert os.path.realpath(latest) == os.path.realpath(first)
    assert load_checkpoint(latest, "teacher")["step"] == 3
    assert open(os.path.join(first, "checkpoint.pt"), "rb").read() == saved
    save_failing_at(monkeypatch, 2)  # resumed: step 4 is saved, step 5's save fails midway
    with pytest.raises(OSError, match="simulated"):
        train_teacher.main(train_teacher.parse_args(["--out", out, "--resume", first, "--max-steps", "6"]))
    assert load_checkpoint(first, "teacher")["step"] == 4
    assert os.path.realpath(latest) == os.path.realpath(first)


# ---------------------------------------------------------------- the DP teacher, killed and resumed

def test_dp_teacher_sigkill_then_resume_equals_an_uninterrupted_run(tiny_data_root, tmp_path, no_figures):
    """Weights, ledger, accountant history, generator states and the reported epsilon all equal."""
    killed_out, straight_out = str(tmp_path / "killed"), str(tmp_path / "straight")
    argv = ["--epochs", "3", "--max-steps", "36", "--checkpoint-every", "1"]
    killed_teacher_run(dp_teacher_argv(tiny_data_root, killed_out, *argv), killed_out, 5, str(tmp_path / "killed.log"))
    killed_at = load_checkpoint(os.path.join(killed_out, "teacher", "latest"))["step"]
    assert 5 <= killed_at < 36
    resumed = train_teacher.main(train_teacher.parse_args(["--out", killed_out, "--resume"]))
    straight = train_teacher.main(train_teacher.parse_args(dp_teacher_argv(tiny_data_root, straight_out, *argv)))
    a, b = load_checkpoint(straight, "teacher"), load_checkpoint(resumed, "teacher")
    assert a["step"] == b["step"] == 36
    for key in ("generator", "discriminator"):
        for name in a[key]:
            assert torch.allclose(a[key][name].float(), b[key][name].float(), atol=1e-6), (key, name)
    assert a["privacy"] == b["privacy"] and a["privacy"]["mechanisms"][0]["steps"] == 36
    assert a["dp"]["history"] == b["dp"]["history"] == [(1.0, 32 / 400, 36)]
    for key in ("train", "sample", "noise"):
        assert torch.equal(a["rng"][key], b["rng"][key]), key
    records = [read_metrics(run) for run in (straight, resumed)]
    assert [r["step"] for r in records[1]] == list(range(1, 37))
    reported = [[(r["step"], r["epsilon"]) for r in run if "epsilon" in r] for run in records]
    assert reported[0] == reported[1] and [step for step, _ in reported[0]] == [12, 24, 36]
