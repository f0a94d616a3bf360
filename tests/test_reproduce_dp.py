"""`make reproduce-dp` (issue 27, item 4): route 2, a DP teacher trained from scratch on the private split and its
post-processing (distillation set, student, compact model, evaluation, release), no public data and no DP
fine-tuning, every stage with --once.

The commands are read from `make -n` with make variables set on its command line (OUT_DP, the DP_* sizes) and parsed
by each script's own parse_args, which is what the script would run with (a flag given twice: the last wins). One
tiny real run of the teacher's command shows it reads the private split and nothing else. `-o setup`: make installs
nothing here.
"""
import importlib
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_D, TINY_G, tiny_data_args
from utils.evaluation.metrics import PROTOCOL
from utils.run.checkpoint import input_run, load_checkpoint
from utils.run.cli import run_script

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="runs make (make test has it)")

ROUTE2 = ("train_teacher.py", "create_dataset.py", "train_student.py", "compress_student.py", "evaluate.py",
          "generate.py")
ROUTE1_STAGES = ("teacher", "student", "compact", "private")  # the generator stages a route-1 OUT holds
# route 2's best measured settings (benchmarks/results/recipe.md, "Route 2 at real length": b512-d2c, 70.5 % teacher
# and 71.3 % compact under the published protocol): (script, argument, value)
RESULTS_SETTINGS = (("train_teacher.py", "batch_size", 512), ("train_teacher.py", "epochs", 44),
                    ("train_teacher.py", "target_epsilon", 10.0), ("train_teacher.py", "adaptive_d_steps", False),
                    ("train_teacher.py", "d_steps_per_g_step", 2), ("train_teacher.py", "reuse_fakes", True),
                    ("train_teacher.py", "ema_decay", 0.995), ("train_teacher.py", "max_steps", None),
                    ("train_teacher.py", "g_channels", [128, 64, 32]), ("create_dataset.py", "num_samples", 20000),
                    ("train_student.py", "batch_size", 64), ("train_student.py", "max_steps", 600),
                    ("train_student.py", "rho", 0.05))
TINY_SIZES = {"DP_TEACHER": "--batch-size 16 --epochs 1", "DP_DISTILL": "--num-samples 200",
              "DP_STUDENT": "--batch-size 8 --max-steps 3 --rho 0.5", "DP_COMPACT": "--check-samples 8",
              "DP_EVAL": "--quick", "DP_RELEASE": "--num-samples 10"}


def make_commands(target: str, **variables) -> list:
    """The script command lines (script first) that `make <target>` runs, read from `make -n`."""
    argv = ["make", "-s", "-n", "-o", "setup", target, f"PY={sys.executable}",
            *(f"{name}={value}" for name, value in variables.items())]
    listing = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = [shlex.split(line) for line in listing.replace("\\\n", " ").splitlines() if line.strip()]
    return [line[1:] for line in lines if line[0] == sys.executable]


def parsed(commands) -> list:
    """(script, its arguments as its own parse_args reads them) for each command."""
    scripts = [os.path.basename(command[0]) for command in commands]
    return [(script, importlib.import_module(script[:-3]).parse_args(command[1:]))
            for script, command in zip(scripts, commands)]


def route2(**variables) -> dict:
    """Script -> its parsed arguments in `make reproduce-dp`."""
    return dict(parsed(make_commands("reproduce-dp", **variables)))


def test_six_stages_in_order_each_once_with_k_of_6_and_no_fine_tuning(tmp_path):
    stages = parsed(make_commands("reproduce-dp", OUT_DP=str(tmp_path)))
    assert [script for script, _ in stages] == list(ROUTE2)  # fine_tune.py not among them
    for k, (script, args) in enumerate(stages, 1):
        assert args.once and args.pipeline_stage == f"{k}/6" and args.out == str(tmp_path), script


def test_the_teacher_is_dp_on_the_private_split_whatever_dp_teacher_says(tmp_path):
    teacher = route2(OUT_DP=str(tmp_path), DP_TEACHER="--split public --batch-size 16")["train_teacher.py"]
    assert teacher.dp and teacher.split == "private" and teacher.batch_size == 16


def test_the_teachers_command_trains_on_the_private_split_and_reads_nothing_public(tiny_data_root, tmp_path,
                                                                                  monkeypatch):
    """A tiny real run of the teacher's command (its DP_TEACHER asking for the public split, in vain): it loads
    the private split only, and its ledger records one DP mechanism, no public data, no non-DP read."""
    import train_teacher
    tiny = (f"{' '.join(tiny_data_args(tiny_data_root))} --g-channels {' '.join(TINY_G)} --d-channels "
            f"{' '.join(TINY_D)} --batch-size 32 --epochs 1 --max-steps 2 --target-epsilon 10 --accountant rdp "
            f"--device cpu --split public")
    command = make_commands("reproduce-dp", OUT_DP=str(tmp_path), DP_TEACHER=tiny)[0]
    loaded, load_split = [], train_teacher.load_split
    monkeypatch.setattr(train_teacher, "load_split",
                        lambda dataset, split, *rest, **options: loaded.append(split) or
                        load_split(dataset, split, *rest, **options))
    assert run_script(train_teacher.main, train_teacher.parse_args, command[1:]) == 0
    ledger = load_checkpoint(os.path.join(tmp_path, "teacher", "latest"), "teacher")["privacy"]
    assert loaded == ["private"]
    assert ledger["public_data"] == [] and ledger["non_dp_reads"] == []
    assert [mechanism["stage"] for mechanism in ledger["mechanisms"]] == ["teacher"]


def test_evaluation_and_release_read_this_routes_runs_even_in_route_1s_out(tmp_path):
    """The worst case, OUT_DP set to a route-1 OUT: `latest` of every route-1 generator stage is there (after
    route 2's stages 1-4, teacher/ and compact/ point at route 2's runs). The evaluation reads the teacher and the
    compact model only (by default it would evaluate route 1's student and private generator, the latter with route
    2's teacher as its baseline) and the release writes the compact model's images (by default: route 1's private
    generator, released as route 2's)."""
    shared = str(tmp_path)
    for stage in ROUTE1_STAGES:
        os.makedirs(os.path.join(shared, stage, "00000-route1"))
        os.symlink("00000-route1", os.path.join(shared, stage, "latest"))
    stages = route2(OUT_DP=shared)
    import evaluate
    import generate
    assert evaluate.run_paths(stages["evaluate.py"]) == [os.path.join(shared, "teacher", "latest"),
                                                         os.path.join(shared, "compact", "latest")]
    release = stages["generate.py"]
    assert input_run(release.run, generate.RUN_DIR, release.out, "private") == os.path.join(shared, "compact",
                                                                                            "latest")


@pytest.mark.parametrize("out", [None, "/elsewhere/runs"])
def test_route_2_has_an_out_of_its_own_apart_from_route_1s(out):
    """By default (OUT_DP unset, with or without OUT) route 2 writes beside route 1, not into its stage
    directories, so neither moves the other's `latest` links."""
    variables = {"OUT": out} if out else {}
    route1_out = parsed(make_commands("reproduce", **variables))[0][1].out
    for script, args in route2(**variables).items():
        assert os.path.normpath(args.out) != os.path.normpath(route1_out), script


def test_the_dp_variables_set_the_sizes(tmp_path):
    today, tiny = route2(OUT_DP=str(tmp_path)), route2(OUT_DP=str(tmp_path), **TINY_SIZES)
    for script, key, value in RESULTS_SETTINGS:
        assert getattr(today[script], key) == value, (script, key)
    import evaluate
    assert evaluate.downstream_protocol(today["evaluate.py"]) == PROTOCOL  # the published protocol by default
    assert today["generate.py"].num_samples == 60000
    assert (tiny["train_teacher.py"].batch_size, tiny["train_teacher.py"].epochs) == (16, 1)
    assert tiny["create_dataset.py"].num_samples == 200
    assert (tiny["train_student.py"].batch_size, tiny["train_student.py"].max_steps,
            tiny["train_student.py"].rho) == (8, 3, 0.5)
    assert tiny["compress_student.py"].check_samples == 8
    assert tiny["evaluate.py"].quick and evaluate.downstream_protocol(tiny["evaluate.py"]) != PROTOCOL
    assert tiny["generate.py"].num_samples == 10


def test_make_pipelines_dp_stage_inherits_the_narrow_discriminator(tiny_data_root):
    """`make pipeline`'s teacher trains the 64/128 discriminator that its DP stage inherits, not the non-private
    default 128/256/512: under DP-SGD the wider one cost the private generator its quality (Makefile comment,
    benchmarks/results/recipe.md). Built from the teacher command's own parsed arguments on 28-pixel data."""
    import train_teacher
    from utils.data.datasets import load_split

    args = dict(parsed(make_commands("pipeline", OUT="/tmp/unused")))["train_teacher.py"]
    assert not args.dp
    split = load_split(args.dataset, args.split, tiny_data_root, 200)
    assert train_teacher.build_models(args, None, split)[1].channels == (64, 128)
