"""`make reproduce` run again continues where it stopped (issue 27), on a tiny make-driven chain in a temporary
OUT: killed during the student stage and run again, it ends with the files of an uninterrupted chain (the same
run directories and files; weights, optimiser and random states, ledger and metrics equal); run once more, it
changes nothing.

The sizes are the Makefile's FULL_* variables, replaced on make's command line by tiny ones. `-o setup`: the venv
and the data are the suite's own (`make test` has just set them up), so make installs nothing here. The run that
is killed is make's six commands (`make -n`) run one after the other in a process forked from the suite's server
(tests/forked.py), SIGKILLed during the student stage: make writes nothing itself, so killing it with its stage
leaves what this leaves, without three interpreter starts. The run again is `make reproduce` itself. The
uninterrupted chain, and the run once more, run the six commands in this process.
"""
import importlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import forked
from conftest import FP32, ROOT, TINY_D, TINY_G, tiny_data_args
from test_reliability import snapshot
from utils.run.checkpoint import load_checkpoint, read_metrics
from utils.run.cli import run_script

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="runs make (make test has it)")

STAGES = ("teacher", "distill", "student", "compact", "private", "eval")
STUDENT_STEPS = 60  # 12 steps per epoch of the 200-sample set: the kill (at step 10, or a few after) lands long
# before the end, and the continued run crosses epochs
KILL_AT = 10
COMPARED = ("step", "generator", "generator_live", "discriminator", "optimizers", "rng", "privacy", "dp")
EVAL_FIELDS = ("label", "step", "fd", "precision", "recall", "downstream_accuracy", "mia_auc", "epsilon")


def tiny_sizes(data_root: str) -> dict:
    """The Makefile's FULL_* variables with tiny data, widths, steps and timings (float32 on the CPU)."""
    data, cpu = " ".join(tiny_data_args(data_root)), "--device cpu"
    fp32 = f"{cpu} {' '.join(FP32)}"
    timings = "--latency-repeats 1 --throughput-repeats 1"
    return {
        "FULL_TEACHER": f"{data} --g-channels {' '.join(TINY_G)} --d-channels {' '.join(TINY_D)} --batch-size 16 "
                        f"--max-steps 6 {fp32}",
        "FULL_DISTILL": f"--num-samples 200 --batch-size 64 {fp32}",
        "FULL_STUDENT": f"--batch-size 16 --epochs 10 --max-steps {STUDENT_STEPS} --checkpoint-every 1 --log-every 1 "
                        f"--rho 0.01 {fp32}",
        "FULL_COMPACT": f"--check-samples 64 {timings} --throughput-batch 8 {cpu}",
        "FULL_PRIVATE": f"{data} --batch-size 32 --max-steps 4 --accountant rdp {timings} --throughput-batch 8 {cpu}",
        "FULL_EVAL": f"{data} --num-fd-samples 100 --num-downstream-samples 240 --downstream-epochs 1 "
                     f"--classifier-epochs 1 --audit-samples 100 --audit-members 50 {timings} --max-steps 5 {fp32} "
                     "--accountant rdp",  # the ledger's own (FULL_PRIVATE); PRV takes ~0.3 s per epsilon
    }


def make_argv(out: str, data_root: str) -> list:
    sizes = [f"{name}={value}" for name, value in tiny_sizes(data_root).items()]
    return ["make", "-s", "-o", "setup", "reproduce", f"OUT={out}", f"PY={sys.executable}", *sizes]


def chain_commands(out: str, data_root: str) -> list:
    """The chain's commands as make would run them (`make -n`): [(script module name, argv), ...]."""
    listing = subprocess.run([*make_argv(out, data_root), "-n"], cwd=ROOT, capture_output=True, text=True, check=True)
    commands = [shlex.split(line) for line in listing.stdout.splitlines() if line.strip()]
    assert [os.path.basename(command[1]) for command in commands] == [
        "train_teacher.py", "create_dataset.py", "train_student.py", "compress_student.py", "fine_tune.py",
        "evaluate.py"]
    return [(os.path.basename(command[1])[:-3], command[2:]) for command in commands]


def run_commands_in_process(out: str, data_root: str):
    """The chain's commands, each run in this process as its script's __main__ would run it."""
    for name, argv in chain_commands(out, data_root):
        script = importlib.import_module(name)
        assert run_script(script.main, script.parse_args, argv) == 0, (name, argv)


def student_step(out: str):
    """The step of the student's latest checkpoint, None while there is none (or it is being replaced)."""
    try:
        return load_checkpoint(os.path.join(out, "student", "latest"))["step"]
    except Exception:  # noqa: BLE001 - not there yet, or mid-write: polled again
        return None


def kill_during_the_student_stage(out: str, data_root: str, log_path: str) -> int:
    """Start the chain's commands one after the other in a forked process, SIGKILL it once the student has a few
    steps behind it; the student step it was killed at."""
    process = forked.run_stages(chain_commands(out, data_root), log_path)
    try:
        deadline = time.time() + 300
        while (student_step(out) or 0) < KILL_AT and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)  # the stage it runs, at an arbitrary point
    finally:
        process.wait(timeout=60)
    return student_step(out)


@pytest.fixture(scope="module")
def chains(tiny_data_root, tmp_path_factory):
    """(continued OUT, uninterrupted OUT, make's output of the second run, the student's metrics lines at the
    kill, the step killed at)."""
    root = tmp_path_factory.mktemp("make-resume")
    continued, straight = str(root / "continued"), str(root / "straight")
    killed_at = kill_during_the_student_stage(continued, tiny_data_root, str(root / "killed.log"))
    student_run = os.path.realpath(os.path.join(continued, "student", "latest"))
    assert killed_at is not None and KILL_AT <= killed_at < STUDENT_STEPS, open(root / "killed.log").read()
    assert not os.path.exists(os.path.join(student_run, "finished.json"))
    lines_at_kill = open(os.path.join(student_run, "metrics.jsonl")).readlines()
    second = subprocess.run(make_argv(continued, tiny_data_root), cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert second.returncode == 0, second.stdout + second.stderr
    run_commands_in_process(straight, tiny_data_root)
    return continued, straight, second.stdout, lines_at_kill, killed_at


def files(out: str) -> list:
    """Every path under out, relative to it."""
    return sorted(os.path.relpath(os.path.join(directory, name), out)
                  for directory, subdirectories, names in os.walk(out) for name in subdirectories + names)


def assert_same(a, b, where: str):
    """Equal, tensors bit for bit, through dicts and lists."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def without_time(records: list) -> list:
    return [{key: value for key, value in record.items() if key != "time"} for record in records]


def test_a_killed_chain_run_again_ends_with_the_files_of_an_uninterrupted_one(chains):
    continued, straight, output, lines_at_kill, killed_at = chains
    for stage in ("teacher", "distill"):
        assert f"{stage}: skipped:" in output
    assert "student: continuing" in output and "== stage 6/6 evaluate.py: done in" in output
    assert files(continued) == files(straight)  # the same runs, numbered alike, with the same files; no leftovers
    for stage in STAGES:
        a = load_checkpoint(os.path.join(continued, stage, "latest"), stage)
        b = load_checkpoint(os.path.join(straight, stage, "latest"), stage)
        assert os.path.basename(a["run_dir"]) == os.path.basename(b["run_dir"])
        for key in COMPARED:
            assert_same(a.get(key), b.get(key), f"{stage}.{key}")
        assert without_time(read_metrics(a["run_dir"])) == without_time(read_metrics(b["run_dir"])), stage
    student_run = os.path.join(continued, "student", "latest")
    lines = open(os.path.join(student_run, "metrics.jsonl")).readlines()
    assert lines[:killed_at] == lines_at_kill[:killed_at]  # continued, not started again: the early records stay
    rows = [json.load(open(os.path.join(out, "eval", "latest", "results.json")))["rows"] for out in chains[:2]]
    assert [[row.get(key) for key in EVAL_FIELDS] for row in rows[0]] == \
        [[row.get(key) for key in EVAL_FIELDS] for row in rows[1]]


def test_a_second_run_of_a_finished_chain_changes_nothing(chains, tiny_data_root, capsys):
    continued = chains[0]
    before = snapshot(continued)
    run_commands_in_process(continued, tiny_data_root)
    assert snapshot(continued) == before
    output = capsys.readouterr().out
    assert all(f"{stage}: skipped:" in output for stage in STAGES), output


def test_the_teacher_runs_the_recipes_length_and_its_epochs_hold_every_step():
    """`make reproduce`'s teacher is the recipe chosen at length (benchmarks/results/recipe.md, "Batch 128 on the
    wider discriminator"): 8,000 steps of batch 128 on the non-private default discriminator. Its --epochs must hold
    all of those steps: an epoch limit below them would end the run early, shorter than the recipe, without a word."""
    import train_teacher
    from test_reproduce_dp import make_commands
    command = make_commands("reproduce")[0]
    assert os.path.basename(command[0]) == "train_teacher.py"
    args = train_teacher.parse_args(command[1:])
    assert (args.max_steps, args.batch_size, args.split, args.dp) == (8000, 128, "public", False)
    assert args.d_channels is None and train_teacher.NON_PRIVATE_D_CHANNELS[28] == (128, 256, 512)
    assert args.epochs * (args.public_size // args.batch_size) >= args.max_steps  # full batches only (drop_last)


def test_the_student_runs_its_curves_length_and_its_epochs_hold_every_step():
    """`make reproduce`'s student runs the length its learning curve says is enough (benchmarks/results/
    student_curve.md: flat from 500 to 8,000 steps of batch 64), 4,000 steps of batch 64 at the default rho, not the
    seed's 20 epochs of the 200k set (31,250 steps of batch 128, about 11 hours). Its --epochs must hold those steps
    on the distillation set the stage before writes, or the run would end early without a word."""
    import create_dataset
    import train_student
    from test_reproduce_dp import make_commands
    commands = make_commands("reproduce")
    assert [os.path.basename(command[0]) for command in commands[1:3]] == ["create_dataset.py", "train_student.py"]
    distill, student = create_dataset.parse_args(commands[1][1:]), train_student.parse_args(commands[2][1:])
    assert (student.max_steps, student.batch_size, student.rho) == (4000, 64, 0.01)
    assert student.epochs * (distill.num_samples // student.batch_size) >= student.max_steps  # drop_last batches


def test_the_dp_stage_is_route_1s_chosen_preset_at_epsilon_10():
    """`make reproduce`'s DP stage is route 1's, chosen from a converged compact model (benchmarks/results/
    recipe.md, "Route 1's DP stage from the converged compact model": 0.25 epochs of expected batch 64 at lr-g 1e-5,
    as good as its public-only start), at epsilon 10; not the seed's 20 epochs of batch 128 (7,800 DP steps: 70.1 %
    against the preset's 84.7 % from the same start, and about 1 h 43 min against 2 min 39 s on 2 cores; docs/
    RESULTS.md, "make reproduce, measured"), which stay one override away."""
    import fine_tune
    from test_reproduce_dp import make_commands
    command = make_commands("reproduce")[4]
    assert os.path.basename(command[0]) == "fine_tune.py"
    args = fine_tune.parse_args(command[1:])
    assert (args.batch_size, args.epochs, args.lr_g, args.target_epsilon) == (64, 0.25, 1e-5, 10)
    seeds = fine_tune.parse_args(make_commands("reproduce", FULL_PRIVATE="--epochs 20 --target-epsilon 10")[4][1:])
    assert (seeds.batch_size, seeds.epochs, seeds.lr_g) == (128, 20, 1e-4)  # the seed's stage, one override away
