"""The student stage's own discriminator (train_student.py --d-channels): a fresh, seeded discriminator of the given
widths, never with a minibatch std layer, born in the student stage (public-only: it sees teacher images), carried
by compress_student.py into the compact checkpoint and trained by fine_tune.py under DP-SGD, so that a wide teacher's
discriminator need not be the one DP-SGD trains. Without the flag the student starts from the teacher's, as before.

One tiny chain (module fixture): a teacher with discriminator 32/64 and a minibatch std layer, its distillation set,
a student with `--d-channels 16 32` and one without, the compact model of the first and one tiny DP fine-tuning.
"""
import json
import os

import pytest
import torch
from opacus.validators import ModuleValidator

import compress_student
import create_dataset
import fine_tune
import train_student
import train_teacher
from conftest import distill_argv, student_argv, teacher_argv, tiny_data_args
from utils.privacy import dp
from utils.run.checkpoint import build_discriminator, build_generator, lineage, load_checkpoint
from utils.run.cli import UserError, run_script, set_seed

TEACHER_D, STUDENT_D = ["32", "64"], ["16", "32"]
NARROW = ("--d-channels", *STUDENT_D)


def run_student(out, distill_dir, *extra) -> str:
    return train_student.main(train_student.parse_args(student_argv(str(out), distill_dir, *extra)))


def compress_argv(out, student_dir):
    return ["--out", str(out), "--student-dir", student_dir, "--check-samples", "64", "--latency-repeats", "1",
            "--throughput-repeats", "1", "--throughput-batch", "8", "--device", "cpu"]


def fine_tune_argv(data_root, out, compact_dir):
    return ["--out", str(out), *tiny_data_args(data_root), "--generator-dir", compact_dir, "--batch-size", "32",
            "--epochs", "1", "--target-epsilon", "4", "--accountant", "rdp", "--device", "cpu", "--log-every", "1"]


@pytest.fixture(scope="module")
def chain(tiny_data_root, tmp_path_factory):
    """{name: run dir} of the tiny chain: teacher (D 32/64, minibatch std 4), distill, student (--d-channels 16 32),
    default (the same student without the flag), compact (of student) and private (its DP fine-tuning, without
    the device export)."""
    out = str(tmp_path_factory.mktemp("student-d"))
    runs = {"teacher": train_teacher.main(train_teacher.parse_args(
        teacher_argv(tiny_data_root, out, "--d-channels", *TEACHER_D, "--minibatch-std", "4")))}
    runs["distill"] = create_dataset.main(create_dataset.parse_args(distill_argv(out, "--teacher-dir",
                                                                                 runs["teacher"])))
    runs["student"] = run_student(out, runs["distill"], *NARROW)
    runs["default"] = run_student(os.path.join(out, "default"), runs["distill"])
    runs["compact"] = compress_student.main(compress_student.parse_args(compress_argv(out, runs["student"])))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fine_tune, "write_device_artifacts", lambda run_dir, G: {})
        runs["private"] = fine_tune.main(fine_tune.parse_args(fine_tune_argv(tiny_data_root, out, runs["compact"])))
    return runs


def checkpoints(chain) -> dict:
    return {name: load_checkpoint(run, name if name != "default" else "student") for name, run in chain.items()}


def test_the_students_narrow_discriminator_is_the_one_the_dp_stage_trains(chain):
    c = checkpoints(chain)
    assert build_discriminator(c["teacher"]).channels == (32, 64) and c["teacher"]["model_args"][
        "discriminator"]["minibatch_std"] == 4
    student_d = c["student"]["model_args"]["discriminator"]
    assert student_d == {**c["teacher"]["model_args"]["discriminator"], "channels": [16, 32], "minibatch_std": 0}
    # the compact checkpoint carries it unchanged, and fine_tune.py starts from exactly it
    assert c["compact"]["model_args"]["discriminator"] == student_d
    assert all(torch.equal(value, c["student"]["discriminator"][name])
               for name, value in c["compact"]["discriminator"].items())
    _, start = fine_tune.build_models(c["compact"], torch.device("cpu"))
    assert all(torch.equal(value, c["compact"]["discriminator"][name]) for name, value in start.state_dict().items())
    private = build_discriminator(c["private"])
    assert private.channels == (16, 32) and private.minibatch_std == 0
    assert not torch.equal(private.state_dict()["net.0.weight"], start.state_dict()["net.0.weight"])  # it trained
    dp.register_opacus_validators()
    assert ModuleValidator.validate(private, strict=True) == []
    # without the flag the student's discriminator is the teacher's, as before
    assert c["default"]["model_args"]["discriminator"] == c["teacher"]["model_args"]["discriminator"]


def test_ledger_and_lineage_are_those_of_the_student_without_the_flag(chain):
    c = checkpoints(chain)
    narrow, default = c["student"], c["default"]
    assert narrow["privacy"] == default["privacy"] == c["distill"]["privacy"]
    assert (narrow["parent"], narrow["teacher"]) == (default["parent"], default["teacher"]) \
        == (c["distill"]["run_dir"], c["teacher"]["run_dir"])
    assert set(narrow) == set(default) and narrow["model_args"]["generator"] == default["model_args"]["generator"]
    differ = {key for key in set(narrow["args"]) | set(default["args"])
              if narrow["args"].get(key) != default["args"].get(key) and key != "out"}
    assert differ == {"d_channels", "d_init"}
    with open(os.path.join(chain["student"], "args.json")) as file:
        recorded = json.load(file)
    assert (recorded["d_channels"], recorded["d_init"]) == ([16, 32], "scratch")
    assert (default["args"]["d_channels"], default["args"]["d_init"]) == (None, "teacher")
    # the compact and private runs: the usual lineage and ledger (public reads only, then the DP stage's mechanism)
    assert c["compact"]["privacy"] == narrow["privacy"] and c["compact"]["parent"] == narrow["run_dir"]
    ledger = c["private"]["privacy"]
    assert c["private"]["parent"] == c["compact"]["run_dir"] and not ledger["non_dp_reads"]
    assert {key: value for key, value in ledger.items() if key != "mechanisms"} == \
        {key: value for key, value in narrow["privacy"].items() if key != "mechanisms"}
    assert [m["stage"] for m in ledger["mechanisms"]] == ["private"]
    assert lineage(c["private"])["teacher"] == c["teacher"]["run_dir"]
    assert lineage(c["private"])["student"] == narrow["run_dir"]


def test_resume_keeps_the_widths_and_equals_the_uninterrupted_run(chain, tmp_path):
    part = run_student(tmp_path, chain["distill"], *NARROW, "--max-steps", "2")
    resumed = train_student.main(train_student.parse_args(["--out", str(tmp_path), "--resume", part,
                                                           "--max-steps", "4", "--device", "cpu"]))
    whole, done = load_checkpoint(chain["student"], "student"), load_checkpoint(resumed, "student")
    assert done["step"] == 4 and done["model_args"]["discriminator"]["channels"] == [16, 32]
    for key in ("generator", "discriminator"):
        assert all(torch.equal(whole[key][name], done[key][name]) for name in whole[key]), key


def resolved(*argv):
    """The flags as main resolves them before building the models (the student: the teacher's widths, 8 bits)."""
    args = train_student.parse_args(list(argv))
    train_student.resolve_d_init(args)
    args.width_mult, args.quant_bits = 1.0, 8
    return args


def test_the_fresh_discriminator_is_seeded_and_without_the_flag_is_the_teachers(chain):
    teacher = load_checkpoint(chain["teacher"], "teacher")
    built = []
    for seed in (0, 0, 1):
        set_seed(seed)
        built.append(train_student.build_models(resolved(*NARROW), None, teacher)[1].state_dict())
    assert all(torch.equal(built[0][name], built[1][name]) for name in built[0])
    assert not torch.equal(built[0]["net.0.weight"], built[2]["net.0.weight"])
    _, D = train_student.build_models(resolved(), None, teacher)
    assert D.minibatch_std == 4 and all(torch.equal(value, teacher["discriminator"][name])
                                        for name, value in D.state_dict().items())


def test_an_init_student_with_d_channels_gets_a_fresh_discriminator(chain):
    init, teacher = load_checkpoint(chain["default"], "student"), load_checkpoint(chain["teacher"], "teacher")
    G, D = train_student.build_models(resolved("--init-student", chain["default"], *NARROW), None, teacher, init)
    assert all(torch.equal(value, init["generator"][name]) for name, value in G.state_dict().items())
    assert D.channels == (16, 32) and D.minibatch_std == 0


@pytest.mark.parametrize("flags,message", [
    (["--d-init", "teacher", *NARROW], "error: --d-init teacher contradicts --d-channels 16 32"),
    (["--d-channels", "16"], "error: --d-channels: discriminator channels must be 2 or 3"),
])
def test_a_contradiction_or_widths_that_do_not_fit_are_refused_in_one_line(chain, tmp_path, capsys, flags,
                                                                           message):
    out = tmp_path / "out"
    code = run_script(train_student.main, train_student.parse_args, student_argv(str(out), chain["distill"], *flags))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(message) and "\n" not in err, err
    assert not os.path.exists(out)
    # --d-init scratch says the same as --d-channels: no contradiction
    assert train_student.main(train_student.parse_args(student_argv(str(out), chain["distill"], "--dry-run",
                                                                    "--d-init", "scratch", *NARROW))) is None
