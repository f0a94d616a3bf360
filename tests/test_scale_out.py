"""`torchrun --nproc_per_node=2` on the stage scripts (gloo, tiny models): the same run as one process, rank 0
alone writes, and a killed 2-process DP run ends (no hang) and resumes to the uninterrupted result and ledger.

torchrun's launcher runs forked from the suite's server (tests/forked.py): its command line is `main(argv)` of
torch.distributed.run; the workers it starts are fresh interpreters running train_teacher.py, as under torchrun.
"""
import os
import signal
import subprocess
import time

import pytest
import torch

import forked
import train_teacher
from conftest import teacher_argv
from utils.privacy.ledger import epsilon
from utils.run.checkpoint import load_checkpoint, read_metrics
from utils.run.precision import bf16_support

BF16_ATOL = 1e-3  # bf16 rounds activations to 8 bits of mantissa: sharding the batch may round otherwise
HANG_GUARD_S = 300  # a launch that takes longer than this is hanging, not slow
DP_FLAGS = ["--dp", "--split", "private", "--d-steps-per-g-step", "2", "--log-every", "1"]


def torchrun(log_path, *argv, nproc: int = 2) -> forked.Forked:
    """`torchrun --standalone --nproc_per_node=<nproc> train_teacher.py argv`, its output in `log_path`."""
    return forked.torchrun(["--standalone", f"--nproc_per_node={nproc}", "train_teacher.py", *argv], str(log_path))


def finished(process: forked.Forked) -> tuple:
    return process.wait(timeout=HANG_GUARD_S), process.output()


def run_dirs(out: str) -> list:
    return sorted(name for name in os.listdir(os.path.join(out, "teacher")) if name != "latest")


def assert_same_models(a: dict, b: dict, atol=1e-5):
    for part in ("generator", "discriminator"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key].float(), b[part][key].float(), atol=atol, rtol=1e-4,
                                       msg=f"{part}.{key}")


def test_two_process_teacher_equals_one_process(tiny_data_root, tmp_path):
    argv = teacher_argv(tiny_data_root, str(tmp_path / "two"), "--max-steps", "4", "--log-every", "1")
    code, output = finished(torchrun(tmp_path / "two.log", *argv))
    assert code == 0, output
    one = train_teacher.main(train_teacher.parse_args(teacher_argv(tiny_data_root, str(tmp_path / "one"),
                                                                   "--max-steps", "4", "--log-every", "1")))
    assert run_dirs(str(tmp_path / "two")) == [os.path.basename(one)]  # one run directory: rank 0's
    two = os.path.join(str(tmp_path / "two"), "teacher", "latest")
    a, b = load_checkpoint(one), load_checkpoint(two)
    assert a["step"] == b["step"] == 4
    assert_same_models(a, b)
    assert torch.equal(a["rng"]["train"], b["rng"]["train"])
    losses = [[(r["step"], round(r["d_loss"], 5), round(r["g_loss"], 5)) for r in read_metrics(run)]
              for run in (one, two)]
    assert losses[0] == losses[1] and len(losses[0]) == 4  # the global batch's losses, logged once
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))


def test_two_process_bf16_teacher_equals_one_process(tiny_data_root, tmp_path):
    """bf16 autocast under torchrun: the global-batch BatchNorm takes bfloat16 activations (its statistics stay
    float32) and the two processes train what one does, to bf16's precision."""
    if not bf16_support(torch.device("cpu"))[0]:
        pytest.skip("this CPU has no native bf16: --precision bf16 is refused")
    argv = teacher_argv(tiny_data_root, str(tmp_path / "two"), "--max-steps", "4", "--precision", "bf16")
    code, output = finished(torchrun(tmp_path / "two.log", *argv))
    assert code == 0, output
    one = train_teacher.main(train_teacher.parse_args(teacher_argv(tiny_data_root, str(tmp_path / "one"),
                                                                   "--max-steps", "4", "--precision", "bf16")))
    a, b = load_checkpoint(one), load_checkpoint(os.path.join(str(tmp_path / "two"), "teacher", "latest"))
    assert a["precision"] == b["precision"] and a["precision"].startswith("bf16")
    assert_same_models(a, b, atol=BF16_ATOL)


def kill_one_worker_at(out: str, step: int, launcher: forked.Forked):
    """SIGKILL one of torchrun's workers once rank 0 has checkpointed `step`."""
    latest = os.path.join(out, "teacher", "latest")
    deadline = time.time() + HANG_GUARD_S
    while time.time() < deadline and launcher.poll() is None:
        try:
            if load_checkpoint(latest)["step"] >= step:
                break
        except Exception:  # noqa: BLE001 - not there yet, or mid-write: retried
            pass
        time.sleep(0.05)
    workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher.pid)], capture_output=True, text=True)
    pids = [int(pid) for pid in workers.stdout.split()]
    assert len(pids) == 2 and launcher.poll() is None, "the run ended before it could be killed"
    os.kill(pids[-1], signal.SIGKILL)


def test_killed_two_process_dp_run_resumes_to_the_uninterrupted_one(tiny_data_root, tmp_path):
    out = str(tmp_path / "killed")
    argv = teacher_argv(tiny_data_root, out, "--max-steps", "16", "--checkpoint-every", "1", *DP_FLAGS)
    launcher = torchrun(tmp_path / "killed.log", *argv)
    kill_one_worker_at(out, 3, launcher)
    code, output = finished(launcher)  # torchrun stops the other worker: no hang
    assert code != 0, output
    killed_at = load_checkpoint(os.path.join(out, "teacher", "latest"))["step"]
    assert 3 <= killed_at < 16
    code, output = finished(torchrun(tmp_path / "resumed.log", "--out", out, "--resume", "--device", "cpu"))
    assert code == 0, output
    straight = train_teacher.main(train_teacher.parse_args(
        teacher_argv(tiny_data_root, str(tmp_path / "straight"), "--max-steps", "16", *DP_FLAGS)))
    a, b = load_checkpoint(straight), load_checkpoint(os.path.join(out, "teacher", "latest"))
    assert a["step"] == b["step"] == 16
    assert_same_models(a, b)
    assert a["dp"]["history"] == b["dp"]["history"] == [(a["dp"]["plan"]["noise_multiplier"], 16 / 400, 16)]
    assert a["privacy"]["mechanisms"] == b["privacy"]["mechanisms"]  # same sigma, q, steps, C: the same ledger
    assert epsilon(a["privacy"], 1e-5) == epsilon(b["privacy"], 1e-5)
    assert [r["step"] for r in read_metrics(b["run_dir"])] == list(range(1, 17))
    assert run_dirs(out) == [os.path.basename(b["run_dir"])]
