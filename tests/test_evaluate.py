"""evaluate.py and utils/evaluation/metrics.py: Frechet distance, downstream accuracy, the membership audit, the cached
reference classifier, and one tiny end-to-end evaluation writing every output."""
import json
import math
import os

import numpy as np
import pytest
import torch

import evaluate
from conftest import FP32, tiny_data_args
from models import Generator
from utils.compression import deploy, runtime
from utils.data.datasets import load_split, seeded_subset, subset_ids, to_unit_range
from utils.evaluation.metrics import (PROTOCOL, QUICK_PROTOCOL, downstream_accuracy, frechet_distance,
                                      frechet_distance_of, membership_auc, reference_classifier)
from utils.privacy.audit import rank_auc
from utils.privacy.ledger import inherit, new_ledger, record_data_read, record_mechanism
from utils.run.checkpoint import load_checkpoint, mark_latest, new_run_dir, save_checkpoint
from utils.run.cli import run_script


def tiny(data_root, split):
    data = load_split("fashion-mnist", split, data_root, public_size=200)
    return to_unit_range(data.images), data.labels


# ---------------------------------------------------------------- Frechet distance

def test_frechet_distance_of_a_set_with_itself_is_zero_and_with_noise_is_large():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))  # correlated, full-rank covariance
    noise = rng.uniform(-5, 5, size=(500, 16)) + 3.0
    assert frechet_distance_of(features, features) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance_of(features, noise) > 100.0


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_gaussian_samples_meets_the_closed_form():
    """Samples of N(mu1, S) and N(mu2, c^2 S) with a full (non-diagonal) S: the two covariances commute, so the
    distance is |mu1 - mu2|^2 + (1 - c)^2 tr(S) exactly; 200000 samples in 4 dimensions estimate it to ~1%."""
    rng = np.random.default_rng(2)
    mixing = np.array([[1.0, 0.5, 0.0, 0.2], [0.0, 1.0, -0.4, 0.0], [0.3, 0.0, 1.0, 0.5], [0.0, 0.2, 0.0, 0.8]])
    covariance, c = mixing @ mixing.T, 2.0
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 0.5]), np.array([1.0, 1.0, 0.0, -0.5])
    expected = np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(covariance)
    a = rng.multivariate_normal(mu1, covariance, size=200000)
    b = rng.multivariate_normal(mu2, c ** 2 * covariance, size=200000)
    assert frechet_distance_of(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(mu1, covariance, mu2, c ** 2 * covariance) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_handles_singular_covariances():
    rng = np.random.default_rng(1)
    few = rng.normal(size=(5, 32))  # 5 samples in 32 dimensions: rank-deficient covariance
    value = frechet_distance_of(few, rng.normal(size=(5, 32)))
    assert math.isfinite(value) and value >= 0


# ---------------------------------------------------------------- downstream accuracy

def test_downstream_accuracy_on_real_images_beats_noise(tiny_data_root):
    train_images, train_labels = tiny(tiny_data_root, "all")
    test_images, test_labels = tiny(tiny_data_root, "test")
    noise = torch.rand(train_images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real = downstream_accuracy(train_images, train_labels, test_images, test_labels, epochs=4, seed=0)
    fake = downstream_accuracy(noise, train_labels, test_images, test_labels, epochs=4, seed=0)
    assert real > 0.8
    assert real > fake + 0.4


# ---------------------------------------------------------------- membership audit

def test_rank_auc_equals_the_pairwise_probability_with_ties():
    positive, negative = np.array([3.0, 1.0, 2.0, 2.0]), np.array([2.0, 0.0, 1.0])
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    assert rank_auc(positive, negative) == pytest.approx(np.mean(pairs))
    assert rank_auc([5.0, 6.0], [1.0, 2.0]) == 1.0


def constant_images(values) -> torch.Tensor:
    """Images of one grey level each: the L2 distance of two is 28 * |difference of levels|."""
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, 1, 28, 28)


def test_membership_auc_of_a_constructed_set_has_its_known_value():
    """Generated = {0}: members at distances 0, 0, .1, .5 and non-members at .05, .3, .6 -> members closer in
    6 + 2 + 1 of the 12 pairs: AUC 0.75."""
    members, nonmembers = constant_images([0.0, 0.0, 0.1, 0.5]), constant_images([0.05, 0.3, 0.6])
    assert membership_auc(members, nonmembers, constant_images([0.0])) == pytest.approx(0.75)
    assert membership_auc(nonmembers, members, constant_images([0.0])) == pytest.approx(0.25)


def test_same_label_membership_auc_of_a_constructed_set_has_its_known_value():
    """Generated 0.0 (label 1) and 1.0 (label 0). Members 0.0 (label 0), 0.9 (label 1); non-members 0.2 (label 0),
    0.95 (label 1). Same label: distances {1.0, 0.9} vs {0.8, 0.95}, AUC 1/4; any label: {0, .1} vs {.2, .05}, 3/4."""
    members, nonmembers, generated = constant_images([0.0, 0.9]), constant_images([0.2, 0.95]), constant_images([0.0, 1.0])
    labels = torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([1, 0])
    assert membership_auc(members, nonmembers, generated, *labels) == pytest.approx(0.25)
    assert membership_auc(members, nonmembers, generated) == pytest.approx(0.75)


@pytest.mark.parametrize("same_label", [False, True])
def test_audit_is_chance_without_leakage_and_detects_copied_members(tiny_data_root, same_label):
    train_images, train_labels = tiny(tiny_data_root, "all")
    nonmembers, nonmember_labels = tiny(tiny_data_root, "test")
    members, member_labels = train_images[:200], train_labels[:200]
    held_out, held_out_labels = train_images[200:], train_labels[200:]  # same distribution, not the members

    def auc(generated, generated_labels):
        labels = (member_labels, nonmember_labels, generated_labels) if same_label else ()
        return membership_auc(members, nonmembers, generated, *labels)

    assert abs(auc(held_out, held_out_labels) - 0.5) < 0.1
    leaky = torch.cat([held_out, members]), torch.cat([held_out_labels, member_labels])
    assert auc(*leaky) > 0.95


# ---------------------------------------------------------------- reference classifier cache

def test_reference_classifier_is_trained_once_and_cached(tiny_data_root, tmp_path):
    train, test = tiny(tiny_data_root, "all"), tiny(tiny_data_root, "test")
    settings = {"epochs": 1, "seed": 0, "max_steps": 3}
    first, info = reference_classifier(str(tmp_path), "fashion-mnist", train, test, settings)
    second, cached = reference_classifier(str(tmp_path), "fashion-mnist", train, test, settings)
    assert not info["cached"] and cached["cached"] and os.path.isfile(cached["path"])
    assert cached["test_accuracy"] == info["test_accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    other, changed = reference_classifier(str(tmp_path), "fashion-mnist", train, test, {**settings, "seed": 1})
    assert not changed["cached"] and changed["path"] != info["path"]  # other settings, other cache entry


# ---------------------------------------------------------------- evaluate.py end to end

def make_fake_compact_run(teacher_dir, out):
    """A smaller 8-bit generator with its integer artifact, whose ledger records a non-DP read of the private
    split (epsilon = inf)."""
    teacher = load_checkpoint(teacher_dir, "teacher")
    G = Generator(nz=teacher["model_args"]["generator"]["nz"], channels=(8, 4, 2), bits=8)
    ledger = inherit(teacher["privacy"])
    record_data_read(ledger, "compact", "private", ledger["private_size"], run="fake")
    run_dir = new_run_dir(out, "compact", "fake")
    save_checkpoint(run_dir, {"stage": "compact", "generator": G.state_dict(), "parent": teacher_dir,
                              "model_args": {"generator": G.model_args()}, "privacy": ledger})
    deploy.save_artifact(G, os.path.join(run_dir, deploy.ARTIFACT_NAME))
    runtime.save_runtime_artifact(G.eval(), os.path.join(run_dir, runtime.RUNTIME_NAME))
    mark_latest(run_dir)
    return run_dir


def eval_argv(data_root, out, *extra):
    return ["--out", out, *tiny_data_args(data_root), "--device", "cpu", "--num-fd-samples", "100",
            "--num-downstream-samples", "240", "--downstream-epochs", "1", "--classifier-epochs", "1",
            "--audit-samples", "100",
            "--audit-members", "50", "--latency-repeats", "2", "--throughput-repeats", "1", "--max-steps", "5",
            *FP32, *extra]


def test_evaluate_writes_every_output_with_a_row_per_run(tiny_data_root, tiny_teacher_run, tmp_path, capsys,
                                                         monkeypatch):
    _, teacher_dir = tiny_teacher_run
    out = str(tmp_path)
    os.makedirs(os.path.join(out, "teacher"))
    os.symlink(os.path.abspath(teacher_dir), os.path.join(out, "teacher", "latest"))
    compact_dir = make_fake_compact_run(teacher_dir, out)

    measured = {"fd": [], "mia_auc": []}  # what the metric functions returned, in the order of the runs

    def spy(key, function):
        def recorded(*args, **kwargs):
            measured[key].append(function(*args, **kwargs))
            return measured[key][-1]
        return recorded

    monkeypatch.setattr(evaluate, "frechet_distance", spy("fd", evaluate.frechet_distance))
    monkeypatch.setattr(evaluate, "membership_auc", spy("mia_auc", evaluate.membership_auc))
    run_dir = evaluate.main(evaluate.parse_args(eval_argv(tiny_data_root, out)))  # default: every stage's latest

    for name in ("results.json", "results.md", "comparison.png", "tradeoff.png"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0, name
    assert os.path.dirname(run_dir) == os.path.join(out, "eval")
    results = json.load(open(os.path.join(run_dir, "results.json")))
    rows = {row["stage"]: row for row in results["rows"]}
    assert set(rows) == {"teacher", "compact"}
    assert rows["compact"]["run_dir"] == os.path.realpath(compact_dir)
    for row in rows.values():
        assert math.isfinite(row["fd"]) and 0 <= row["downstream_accuracy"] <= 1
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and row["downstream_epoch"] == 1
        assert len(row["downstream_holdout_accuracy"]) == 1
        assert row["parameters"] > 0 and row["macs"] > 0 and row["bytes"] > 0 and row["latency_ms"] > 0
    # each row reports its own generator's measured FD and AUC, not a stand-in (and the FD of its generator.onnx's
    # own samples right after its model's, where it has one)
    reported = {"fd": [value for row in results["rows"] for value in (row["fd"], row.get("fd_runtime"))
                       if value is not None],
                "mia_auc": [row["mia_auc"] for row in results["rows"] if row["mia_auc"] is not None]}
    assert reported == measured and len(measured["fd"]) == 3
    # the public teacher never read the private split: no members, no AUC; the compact's ledger reads it
    assert rows["teacher"]["mia_auc"] is None and rows["teacher"]["mia_note"] == evaluate.MIA_NOT_READ
    assert 0 <= rows["compact"]["mia_auc"] <= 1 and len(measured["mia_auc"]) == 1
    assert rows["compact"]["audit"]["members"] == 50 and rows["teacher"]["audit"]["members"] == 0
    assert all(row["fd"] > 0.1 for row in results["rows"])  # untrained generators are far from the test set
    assert rows["teacher"]["vs_teacher"]["parameters"] == 1.0 and rows["teacher"]["bytes_source"] == "state dict"
    artifact = os.path.join(compact_dir, deploy.ARTIFACT_NAME)
    assert rows["compact"]["bytes"] == os.path.getsize(artifact) and "artifact" in rows["compact"]["bytes_source"]
    assert rows["compact"]["vs_teacher"]["parameters"] < 1.0
    assert rows["teacher"]["epsilon"] == 0.0 and rows["compact"]["epsilon"] == "inf"
    assert 0 <= results["reference_classifier"]["test_accuracy"] <= 1
    assert os.path.isfile(results["reference_classifier"]["path"])
    assert results["reference_classifier"]["path"].startswith(os.path.join(out, "reference"))

    shipped = rows["compact"]["runtime"]  # what ships: generator.onnx in ONNX Runtime, its own samples
    assert shipped["bytes"] == os.path.getsize(os.path.join(compact_dir, runtime.RUNTIME_NAME))
    assert shipped["vs_teacher"]["bytes"] == shipped["bytes"] / rows["teacher"]["bytes"]
    assert shipped["latency_ms"] > 0 and shipped["images_per_s"] > 0 and "runtime" not in rows["teacher"]
    assert math.isfinite(rows["compact"]["fd_runtime"]) and 0 <= rows["compact"]["recall_runtime"] <= 1
    assert rows["compact"]["runtime_pool_max_abs_diff"] <= runtime.TOLERANCE
    # the artifact's own downstream classifier only with --artifact-downstream (the compression sweep's test)
    assert "downstream_accuracy_runtime" not in rows["compact"]

    table = open(os.path.join(run_dir, "results.md")).read()
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 2 * (1 + 2) - 1  # 2 tables
    assert "What ships: generator.onnx" in table and "| not run (--artifact-downstream) |" in table
    assert "∞ (no DP guarantee)" in table and "Reference classifier" in table
    assert table.count(f"| {evaluate.MIA_NOT_READ} |") == 1
    assert "| FD ↓ | precision ↑ | recall ↑ | downstream acc ↑ (custom variant of Bie et al. 2023 (240 samples, " \
           "1 epochs)) |" in table  # a variant is never labelled as the published protocol
    assert results["downstream_protocol"]["holdout"] == 20 and results["downstream_protocol"]["num_samples"] == 240
    captured = capsys.readouterr()
    assert "NO differential-privacy guarantee" in captured.err  # the plain warning for the epsilon = inf run
    assert run_dir in captured.out


def test_mia_members_are_the_private_images_the_ledger_says_were_read(tiny_data_root, tmp_path):
    args = evaluate.parse_args(eval_argv(tiny_data_root, str(tmp_path)))
    data = evaluate.load_data(args, None)
    private, everything = data["splits"]["private"], data["splits"]["all"]
    ledger = new_ledger(private.partition)
    record_data_read(ledger, "teacher", "public", 200)
    assert evaluate.membership_sets(ledger, data, args) is None  # public only: no members, MIA n/a
    subset = seeded_subset(private, 40, 5)
    on_subset = inherit(ledger)
    record_data_read(on_subset, "teacher", "private", 40, "t", subset.subset)
    (members, _), (nonmembers, _), source = evaluate.membership_sets(on_subset, data, args)
    assert len(members) == len(nonmembers) == 40 and "40 private images of its training subset" in source
    as_rows = lambda images: sorted(map(tuple, images.flatten(1).tolist()))
    assert as_rows(members) == as_rows(to_unit_range(subset.images))  # exactly the images it trained on
    wider = seeded_subset(everything, 100, 5)  # a subset of the whole training set: its private part
    on_all = inherit(ledger)
    record_data_read(on_all, "teacher", "all", 100, "t", wider.subset)
    expected = set(subset_ids(everything, wider.subset).tolist()) & set(private.indices.tolist())
    assert evaluate.trained_private_ids(on_all, data["splits"]).tolist() == sorted(expected)
    dp = inherit(ledger)
    record_mechanism(dp, "private", 1.0, 0.1, 10, 1.0, "rdp", "p")
    assert torch.equal(evaluate.trained_private_ids(dp, data["splits"]), private.indices)
    (members, _), _, source = evaluate.membership_sets(dp, data, args)
    assert len(members) == 50 and source == "the whole private split"


def test_evaluate_rejects_bad_input_with_one_line(tiny_data_root, tmp_path, capsys):
    assert run_script(evaluate.main, evaluate.parse_args,
                      eval_argv(tiny_data_root, str(tmp_path), "--runs", str(tmp_path / "missing"))) == 2
    assert run_script(evaluate.main, evaluate.parse_args, eval_argv(tiny_data_root, str(tmp_path))) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    assert "no generator runs" in errors[1]


def test_quick_preset_and_explicit_flags(capsys):
    args = evaluate.parse_args(["--quick", "--num-fd-samples", "123", "--dry-run"])
    assert args.num_fd_samples == 123 and args.classifier_epochs == 1
    assert evaluate.downstream_protocol(args) is QUICK_PROTOCOL
    assert "(quick variant)" in evaluate.table_columns(QUICK_PROTOCOL)[15]
    full = evaluate.parse_args([])
    assert full.num_fd_samples == 10000 and full.classifier_epochs == 3
    assert evaluate.downstream_protocol(full) is PROTOCOL  # the published protocol is the default
    assert "(Bie et al. 2023)" in evaluate.table_columns(PROTOCOL)[15]
    assert evaluate.main(args) is None
    assert '"num_fd_samples": 123' in capsys.readouterr().out


def test_row_labels_are_unique_across_pipelines_and_snapshots():
    """Runs of one stage from other pipelines may share their number (00000-...) or their whole name: each row
    still gets its own label (the ratios and the comparison grid are keyed by it)."""
    def run(path, stage="teacher", snapshot=None):
        return {"run_dir": path, "stage": stage, "snapshot": snapshot}
    numbered = [run("/a/teacher/00000-x"), run("/a/teacher/00001-y")]
    same_number = [run("/a/teacher/00000-fp32"), run("/b/teacher/00000-bf16")]
    same_name = [run("/a/teacher/00000-quick"), run("/b/teacher/00000-quick")]
    snapshots = [run("/a/teacher/00000-x", snapshot=2), run("/a/teacher/00000-x"), run("/a/compact/00003-q", "compact")]
    assert evaluate.row_labels(numbered) == ["teacher#00000", "teacher#00001"]
    assert evaluate.row_labels(same_number) == ["teacher#00000-fp32", "teacher#00000-bf16"]
    assert evaluate.row_labels(same_name) == ["teacher#1", "teacher#2"]
    assert evaluate.row_labels(snapshots) == ["teacher@2", "teacher", "compact"]
