"""All five stages and the evaluation on a small folder of 32x32 RGB images (3 classes x 40 PNGs), few steps:
every stage rebuilds the 32x32 RGB models from model_args alone, the partition is the folder's, and the outputs
follow the shape."""
import json
import os

import pytest
from PIL import Image

import compress_student
import create_dataset
import evaluate
import fine_tune
import train_student
import train_teacher
from image_folders import write_image_folder
from utils.compression.deploy import load_artifact
from utils.data.datasets import load_split
from utils.run.checkpoint import build_discriminator, build_generator, load_checkpoint
from utils.run.cli import run_script

PUBLIC = "30"


@pytest.fixture(scope="module")
def folder_pipeline(tmp_path_factory):
    """(data root, out, {stage: run dir}) of the whole pipeline on the folder, run once for this module."""
    root = write_image_folder(str(tmp_path_factory.mktemp("rgb") / "images"))
    out = str(tmp_path_factory.mktemp("folder-pipeline"))
    data = ["--dataset", "folder", "--data-root", root, "--public-size", PUBLIC]
    common = ["--out", out, "--device", "cpu"]
    runs = {"teacher": train_teacher.main(train_teacher.parse_args(
        [*common, *data, "--g-channels", "8", "6", "5", "4", "--d-channels", "4", "5", "6", "--batch-size", "16",
         "--max-steps", "3"]))}
    runs["distill"] = create_dataset.main(create_dataset.parse_args([*common, "--num-samples", "60"]))
    runs["student"] = train_student.main(train_student.parse_args(
        [*common, "--batch-size", "16", "--max-steps", "3", "--rho", "2.5"]))
    runs["compact"] = compress_student.main(compress_student.parse_args(
        [*common, "--check-samples", "60", "--latency-repeats", "1", "--throughput-repeats", "1",
         "--throughput-batch", "4"]))
    runs["private"] = fine_tune.main(fine_tune.parse_args(
        [*common, *data, "--batch-size", "16", "--epochs", "1", "--max-steps", "2", "--target-epsilon", "10",
         "--delta", "1e-3", "--accountant", "rdp", "--latency-repeats", "1", "--throughput-repeats", "1",
         "--throughput-batch", "4"]))
    runs["eval"] = evaluate.main(evaluate.parse_args(
        [*common, *data, "--num-fd-samples", "40", "--num-downstream-samples", "60", "--classifier-epochs", "1",
         "--audit-samples", "30", "--audit-members", "10", "--latency-repeats", "1", "--throughput-repeats", "1",
         "--max-steps", "2", "--delta", "1e-3", "--accountant", "rdp"]))
    return root, out, runs


def test_every_stage_keeps_the_32_pixel_rgb_shape(folder_pipeline):
    root, out, runs = folder_pipeline
    for stage in ("teacher", "student", "compact", "private"):
        checkpoint = load_checkpoint(runs[stage], stage)
        G = build_generator(checkpoint)
        assert (G.image_size, G.image_channels, G.num_classes) == (32, 3, 3), stage
        assert G(*G.sample_inputs(2)).shape == (2, 3, 32, 32)
        if "discriminator" in checkpoint:
            assert build_discriminator(checkpoint).model_args()["image_size"] == 32
        assert os.path.isfile(os.path.join(runs[stage], "samples.png"))
    for stage in ("teacher", "private"):  # one row of 10 per class, 32 px + 2 px padding
        with Image.open(os.path.join(runs[stage], "samples.png")) as grid:
            assert grid.mode == "RGB" and grid.size == (10 * 34 + 2, 3 * 34 + 2)
    assert len(load_checkpoint(runs["student"], "student")["model_args"]["generator"]["channels"]) == 4
    assert load_artifact(os.path.join(runs["private"], "generator_int.pt")).image_size == 32


def test_privacy_ledger_names_the_folders_private_split(folder_pipeline):
    root, out, runs = folder_pipeline
    private = load_split("folder", "private", root, int(PUBLIC))
    ledger = load_checkpoint(runs["private"], "private")["privacy"]
    assert ledger["dataset"] == "folder" and ledger["private_fingerprint"] == private.fingerprint
    assert ledger["private_size"] == len(private) == 108 - int(PUBLIC) and len(ledger["mechanisms"]) == 1


def test_evaluation_rows_for_every_stage(folder_pipeline):
    _, _, runs = folder_pipeline
    with open(os.path.join(runs["eval"], "results.json")) as handle:
        results = json.load(handle)
    assert [row["stage"] for row in results["rows"]] == ["teacher", "student", "compact", "private"]
    assert all(0 <= row["downstream_accuracy"] <= 1 and row["fd"] >= 0 for row in results["rows"])
    assert os.path.isfile(os.path.join(runs["eval"], "comparison.png"))


def test_wrong_widths_for_the_size_are_one_line_and_nothing_written(folder_pipeline, tmp_path, capsys):
    root, _, _ = folder_pipeline
    argv = ["--dataset", "folder", "--data-root", root, "--public-size", PUBLIC, "--out", str(tmp_path / "out"),
            "--g-channels", "8", "6", "4", "--device", "cpu"]
    assert run_script(train_teacher.main, train_teacher.parse_args, argv) == 2
    assert "4 positive widths for 32x32" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_later_stage_on_other_data_is_refused(folder_pipeline, tmp_path, capsys):
    root, out, _ = folder_pipeline
    argv = ["--out", out, "--dataset", "folder", "--data-root", root, "--public-size", PUBLIC, "--image-size", "64",
            "--epochs", "1", "--max-steps", "1", "--device", "cpu", "--target-epsilon", "10", "--delta", "1e-3"]
    assert run_script(fine_tune.main, fine_tune.parse_args, argv) == 2
    assert "built for 3x32x32" in capsys.readouterr().err


def test_teacher_on_a_64_pixel_grey_folder_builds_64_pixel_models(tmp_path):
    root = write_image_folder(str(tmp_path / "big"), num_classes=2, per_class=6, size=64, grey=True)
    run_dir = train_teacher.main(train_teacher.parse_args(
        ["--out", str(tmp_path / "out"), "--dataset", "folder", "--data-root", root, "--public-size", "4",
         "--g-channels", "6", "5", "4", "3", "2", "--d-channels", "2", "3", "4", "5", "--batch-size", "4",
         "--max-steps", "2", "--device", "cpu"]))
    checkpoint = load_checkpoint(run_dir, "teacher")
    assert checkpoint["model_args"]["generator"]["image_size"] == 64
    assert build_generator(checkpoint).prunable_layers == ("block0", "block1", "block2", "block3", "block4")
    assert build_discriminator(checkpoint).model_args()["image_channels"] == 1
    with Image.open(os.path.join(run_dir, "samples.png")) as grid:  # two rows (classes) of 10 tiles of 64 px
        assert grid.size == (10 * 66 + 2, 2 * 66 + 2)
