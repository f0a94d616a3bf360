"""Stage 2 (create_dataset.py) and its loader (utils/data/distill.py): shapes, ledger, encoding bound, reproducibility,
atomic writing and refusal of bad input."""
import os
import shutil

import numpy as np
import pytest
import torch

import create_dataset
from conftest import check_sample_grid, distill_argv
from utils.data.distill import load_distill_set
from utils.run.checkpoint import build_generator, load_checkpoint
from utils.run.cli import UserError, run_script


def make_set(out, teacher_dir, *extra):
    return create_dataset.main(create_dataset.parse_args(distill_argv(str(out), "--teacher-dir", teacher_dir,
                                                                      *extra)))


def test_set_reloads_with_shapes_and_ledger(tiny_teacher_run, tiny_distill_run):
    out, teacher_dir = tiny_teacher_run
    distill = load_distill_set(tiny_distill_run[1])
    teacher = load_checkpoint(teacher_dir, "teacher")
    assert len(distill) == 200
    assert distill.z.shape == (200, teacher["model_args"]["generator"]["nz"]) and distill.z.dtype == np.float32
    assert distill.labels.dtype == np.int64 and distill.images.shape == (200, 1, 28, 28)
    assert np.bincount(distill.labels, minlength=10).tolist() == [20] * 10  # balanced
    z, labels, images = distill.batch(torch.tensor([5, 0, 199]))
    assert z.dtype == images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1 and images.shape == (3, 1, 28, 28)
    checkpoint = load_checkpoint(tiny_distill_run[1], "distill")
    assert distill.ledger == teacher["privacy"]  # post-processing: nothing appended
    assert checkpoint["parent"] == distill.teacher_dir == teacher["run_dir"]
    assert checkpoint["step"] == distill.meta["count"] == 200
    assert distill.meta["image_encoding"]["max_abs_error"] == pytest.approx(1 / 255)
    check_sample_grid(os.path.join(distill.run_dir, "samples.png"), tiles=100)  # 10 per class
    assert not [name for name in os.listdir(os.path.dirname(distill.run_dir)) if name.startswith(".")]


def test_stored_images_match_the_teacher(tiny_teacher_run, tiny_distill_run):
    distill = load_distill_set(tiny_distill_run[1])
    teacher = build_generator(load_checkpoint(tiny_teacher_run[1], "teacher")).eval()
    z, labels, images = distill.batch(np.arange(len(distill)))
    with torch.no_grad():
        expected = teacher(z, labels)
    assert (images - expected).abs().max() <= 1 / 127.5
    assert (images - expected).abs().max() <= 1 / 255 + 1e-6  # the documented bound of the uint8 rounding


def test_same_seed_same_files(tiny_teacher_run, tmp_path):
    teacher_dir = tiny_teacher_run[1]
    first = make_set(tmp_path / "a", teacher_dir, "--num-samples", "50", "--seed", "3")
    # another generation batch size: the files do not depend on it
    again = make_set(tmp_path / "b", teacher_dir, "--num-samples", "50", "--seed", "3", "--batch-size", "7")
    other = make_set(tmp_path / "c", teacher_dir, "--num-samples", "50", "--seed", "4")
    for name in ("z.npy", "labels.npy", "images.npy"):
        assert open(os.path.join(first, name), "rb").read() == open(os.path.join(again, name), "rb").read()
    assert not np.array_equal(np.load(os.path.join(first, "z.npy")), np.load(os.path.join(other, "z.npy")))


def test_float32_images_are_exact(tiny_teacher_run, tmp_path):
    run_dir = make_set(tmp_path, tiny_teacher_run[1], "--num-samples", "20", "--image-dtype", "float32")
    distill = load_distill_set(run_dir)
    teacher = build_generator(load_checkpoint(tiny_teacher_run[1], "teacher")).eval()
    z, labels, images = distill.batch(np.arange(20))
    with torch.no_grad():
        assert torch.allclose(images, teacher(z, labels), atol=1e-6)


def test_non_teacher_checkpoint_is_refused(tiny_distill_run, tmp_path, capsys):
    argv = distill_argv(str(tmp_path), "--teacher-dir", tiny_distill_run[1])
    with pytest.raises(UserError, match="'distill' checkpoint, expected teacher"):
        create_dataset.main(create_dataset.parse_args(argv))
    assert run_script(create_dataset.main, create_dataset.parse_args, argv) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not os.path.exists(os.path.join(tmp_path, "distill"))


def test_missing_or_mismatched_files_are_refused(tiny_distill_run, tmp_path):
    broken = shutil.copytree(tiny_distill_run[1], tmp_path / "set")
    os.remove(broken / "images.npy")
    with pytest.raises(UserError, match="images.npy is missing"):
        load_distill_set(str(broken))
    np.save(broken / "images.npy", np.zeros((199, 1, 28, 28), np.uint8))
    with pytest.raises(UserError, match="meta.json says"):
        load_distill_set(str(broken))
    os.remove(broken / "meta.json")
    with pytest.raises(UserError, match="no meta.json"):
        load_distill_set(str(broken))


def test_not_enough_disk_space_is_refused(tiny_teacher_run, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    with pytest.raises(UserError, match="not enough disk space"):
        make_set(tmp_path, tiny_teacher_run[1])
    # refused before anything is written under --out: no run directory, no partial files, no stage directory
    assert not os.path.exists(tmp_path / "distill")


def test_failure_mid_write_leaves_no_run(tiny_teacher_run, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(create_dataset, "save_grid", fail)
    with pytest.raises(KeyboardInterrupt):
        make_set(tmp_path, tiny_teacher_run[1], "--num-samples", "20")
    assert os.listdir(tmp_path / "distill") == []
