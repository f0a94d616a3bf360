"""The audit run mode of fine_tune.py (--audit-canaries, --audit-control) and the audit.py report, end to end on
the tiny dataset: where runs go, what their ledgers say, and the report's files."""
import json
import math
import os

import pytest
import torch

import audit
import fine_tune
from test_fine_tune import ft_argv, public_ledger, write_compact
from utils.data.datasets import load_split, seeded_subset
from utils.privacy.ledger import epsilon, is_audit
from utils.run.checkpoint import load_checkpoint
from conftest import TINY_PUBLIC

CANARIES = 60
SUBSET = 100


@pytest.fixture(scope="module")
def audit_runs(tiny_data_root, tmp_path_factory):
    """(out, compact dir, {control: run dir}) of three one-epoch audit runs: DP at epsilon 4 and no-dp on the whole
    private split with generated canaries (the default), no-clip on a seeded subset of SUBSET private images
    (--audit-subset) with mislabelled canaries."""
    out = tmp_path_factory.mktemp("audit")
    compact = write_compact(out, public_ledger(tiny_data_root))
    runs = {}
    for control in ("none", "no-dp", "no-clip"):
        subset = ("--audit-subset", str(SUBSET), "--audit-canary-kind", "mislabelled") if control == "no-clip" else ()
        argv = ft_argv(tiny_data_root, out, "--target-epsilon", "4", "--audit-canaries", str(CANARIES),
                       "--audit-control", control, "--desc", control, *subset)
        runs[control] = fine_tune.main(fine_tune.parse_args(argv))
    return str(out), compact, runs


def test_audit_runs_have_their_own_directory_and_never_touch_private(audit_runs):
    out, _, runs = audit_runs
    assert all(os.path.dirname(run) == os.path.join(out, "audit") for run in runs.values())
    assert not os.path.exists(os.path.join(out, "private"))
    assert os.path.realpath(os.path.join(out, "audit", "latest")) == os.path.realpath(runs["no-clip"])
    assert not os.path.exists(os.path.join(runs["none"], "generator_int.pt"))  # never deployed
    with pytest.raises(Exception, match="expected"):
        fine_tune.load_source(fine_tune.parse_args(["--generator-dir", runs["none"]]), None)


def test_audit_ledger_split_and_controls(audit_runs, tiny_data_root):
    _, _, runs = audit_runs
    private = load_split("fashion-mnist", "private", tiny_data_root, TINY_PUBLIC)
    dp_run = load_checkpoint(runs["none"], "audit")
    (entry,) = dp_run["privacy"]["audits"]
    assert is_audit(dp_run["privacy"]) and entry["canaries"] == CANARIES and entry["control"] == "none"
    assert entry["subset"] is None and "subset" not in dp_run["data"]
    assert dp_run["data"]["size"] == len(private) + entry["included"] and 0 < entry["included"] < CANARIES
    assert dp_run["data"]["fingerprint"] == private.fingerprint  # the partition a normal run uses
    (mechanism,) = dp_run["privacy"]["mechanisms"]
    assert mechanism["sample_rate"] == pytest.approx(32 / (len(private) + entry["included"]))
    assert 3.9 <= epsilon(dp_run["privacy"], 1e-5, "rdp") <= 4.0
    no_dp = load_checkpoint(runs["no-dp"], "audit")["privacy"]
    assert epsilon(no_dp, 1e-5, "rdp") == math.inf and no_dp["non_dp_reads"][0]["stage"] == "audit"
    assert no_dp["mechanisms"][0]["noise_multiplier"] == 0.0
    no_clip = load_checkpoint(runs["no-clip"], "audit")
    assert no_clip["privacy"]["mechanisms"][0]["max_grad_norm"] == 1.0  # the claim a bug would make
    assert 3.9 <= epsilon(no_clip["privacy"], 1e-5, "rdp") <= 4.0


def test_audit_runs_store_the_canaries_their_ledger_names(audit_runs):
    from utils.privacy.audit import CANARY_FILE, load_canaries
    _, compact, runs = audit_runs
    for control, kind in (("none", "generated"), ("no-clip", "mislabelled")):
        run = load_checkpoint(runs[control], "audit")
        (entry,) = run["privacy"]["audits"]
        canaries = load_canaries(runs[control], entry)
        assert entry["canary_kind"] == canaries.kind == kind and len(canaries) == CANARIES
        assert int(canaries.included.sum()) == entry["included"]
    generated = load_canaries(runs["none"], load_checkpoint(runs["none"], "audit")["privacy"]["audits"][0])
    assert torch.equal(generated.labels, generated.true_labels) and generated.images.dtype == torch.uint8
    # the same seed and starting generator give the same canaries in every audit run
    no_dp = load_canaries(runs["no-dp"], load_checkpoint(runs["no-dp"], "audit")["privacy"]["audits"][0])
    assert torch.equal(generated.images, no_dp.images) and torch.equal(generated.included, no_dp.included)
    assert os.path.isfile(os.path.join(runs["none"], CANARY_FILE))


def test_a_resumed_audit_run_reads_back_its_canaries(audit_runs):
    """On --resume the generator at hand is the audit run's own (trained): canaries drawn from it again would be
    other images, so the run's stored ones are used."""
    from utils.privacy.audit import load_canaries
    from utils.run.lifecycle import resume_args
    _, _, runs = audit_runs
    args, checkpoint = resume_args(fine_tune.parse_args(["--resume", runs["no-dp"]]), "audit")
    _, canaries = fine_tune.training_split(args, checkpoint, checkpoint)
    stored = load_canaries(runs["no-dp"], checkpoint["privacy"]["audits"][0])
    assert torch.equal(canaries.images, stored.images) and torch.equal(canaries.included, stored.included)
    redrawn = fine_tune.build_canaries(args, checkpoint, fine_tune.load_data(args, checkpoint))
    assert not torch.equal(redrawn.images, stored.images)  # what a resume must not do


def test_audit_refuses_canaries_other_than_the_recorded_ones(audit_runs, tmp_path):
    import shutil
    from utils.privacy.audit import CANARY_FILE
    _, _, runs = audit_runs
    copy = str(tmp_path / "00000-copy")
    shutil.copytree(runs["none"], copy)
    assert len(audit.run_canaries(load_checkpoint(copy, "audit"))) == CANARIES  # as stored: accepted
    stored = torch.load(os.path.join(copy, CANARY_FILE), weights_only=True)
    stored["images"][0, 10, 10] ^= 1  # one bit of one pixel
    torch.save(stored, os.path.join(copy, CANARY_FILE))
    with pytest.raises(Exception, match="not the ones the ledger records"):
        audit.run_canaries(load_checkpoint(copy, "audit"))


def test_audit_subset_is_the_audit_split_recorded_and_sets_the_sample_rate(audit_runs, tiny_data_root):
    _, _, runs = audit_runs
    private = load_split("fashion-mnist", "private", tiny_data_root, TINY_PUBLIC)
    run = load_checkpoint(runs["no-clip"], "audit")
    (entry,) = run["privacy"]["audits"]
    assert entry["subset"] == seeded_subset(private, SUBSET, 0).subset == run["data"]["subset"]  # seeded by --seed
    size = SUBSET + entry["included"]
    assert run["data"]["size"] == size and run["data"]["fingerprint"] == private.fingerprint
    (mechanism,) = run["privacy"]["mechanisms"]
    assert mechanism["sample_rate"] == pytest.approx(32 / size) and mechanism["steps"] == int(size / 32)
    assert run["args"]["audit_subset"] == SUBSET
    card = open(os.path.join(runs["none"], "MODEL_CARD.md")).read()
    assert "AUDIT run, not a released model" in card


def test_audit_report(audit_runs, tiny_data_root):
    out, _, runs = audit_runs
    argv = ["--out", out, "--data-root", tiny_data_root, "--num-samples", "200", "--device", "cpu"]
    report = audit.main(audit.parse_args(argv))
    data = json.load(open(os.path.join(report, "audit.json")))
    assert len(data["rows"]) == 6 and {r["attack"] for r in data["rows"]} == {"white-box", "black-box"}
    no_dp_rows = [r for r in data["rows"] if r["run"] == os.path.basename(runs["no-dp"])]
    assert all(r["claimed_epsilon"] == "inf" and r["canaries"] == CANARIES for r in no_dp_rows)
    table = open(os.path.join(report, "results.md")).read()
    assert table.count("| white-box |") == 3 and "∞ (no DP)" in table
    assert table.count("canaries added to the private split;") == 2
    assert f"canaries added to a seeded subset of {SUBSET} private images (seed 0, " in table
    assert os.path.getsize(os.path.join(report, "audit.png")) > 1000
    for run in runs.values():
        assert "Empirical privacy audit" in open(os.path.join(run, "MODEL_CARD.md")).read()
        assert json.load(open(os.path.join(run, "model_card.json")))["audit_result"]["report"] == report


def test_a_bound_above_the_claim_writes_the_report_then_fails_loudly(audit_runs, tiny_data_root, monkeypatch,
                                                                    capsys):
    out, _, runs = audit_runs
    import utils.privacy.audit
    monkeypatch.setattr(utils.privacy.audit, "epsilon_lower_bound",
                        lambda *args, **kwargs: 100.0)  # as a leaky run would
    argv = ["--runs", runs["none"], "--out", out, "--data-root", tiny_data_root, "--num-samples", "100",
            "--device", "cpu", "--desc", "failing"]
    assert audit.run_audit(argv) == 1
    assert "AUDIT FAILED" in capsys.readouterr().err
    report = os.path.realpath(os.path.join(out, "audit-report", "latest"))
    assert report.endswith("-failing") and os.path.isfile(os.path.join(report, "audit.json"))


def test_audit_refuses_a_normal_run(tmp_path, tiny_data_root):
    compact = write_compact(tmp_path, public_ledger(tiny_data_root))
    assert audit.run_audit(["--runs", compact, "--out", str(tmp_path), "--data-root", tiny_data_root]) == 2
    assert audit.run_audit(["--out", str(tmp_path / "empty"), "--data-root", tiny_data_root]) == 2


@pytest.mark.parametrize("flags", [["--audit-control", "no-dp"], ["--audit-subset", "100"]])
def test_audit_options_need_canaries(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fine_tune.parse_args(flags)
    assert exit_info.value.code == 2 and "only for an audit run" in capsys.readouterr().err
