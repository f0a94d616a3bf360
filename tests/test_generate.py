"""generate.py (a released synthetic dataset and its card), its torch-free ONNX path, and evaluate.py --synthetic
(the protocol that scores any such set)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import generate
from conftest import FP32, ROOT, handmade_student, tiny_data_args, tiny_ledger, write_handmade_run
from models import Generator
from test_reliability import snapshot
from utils.compression import runtime
from utils.compression.compress import compress
from utils.data import classes, synthetic
from utils.data.datasets import to_unit_range
from utils.evaluation.model_card import build_card, write_model_card
from utils.gan import latents
from utils.gan.sampling import generated_pool
from utils.privacy.ledger import epsilon, record_audit, record_data_read, record_mechanism
from utils.run.checkpoint import build_generator, load_checkpoint
from utils.run.cli import run_script

NAMES = classes.FASHION_MNIST_CLASSES
DP_ARGS = {"seed": 0, "delta": 1e-5, "accountant": "rdp"}  # RDP: PRV takes seconds per epsilon


def private_ledger() -> dict:
    """Two DP mechanisms (a DP teacher's and this stage's): the total epsilon is not this stage's alone."""
    ledger = tiny_ledger()
    record_mechanism(ledger, "teacher", 2.0, 0.02, 200, 1.0, "rdp", run="t")
    record_mechanism(ledger, "private", 1.1, 0.05, 300, 1.0, "rdp", run="x")
    return ledger


def private_run(out, ledger=None) -> str:
    """A hand-made private run: an 8-bit compact generator (nz 16) with a DP ledger, its generator.onnx and its
    model card beside it, as fine_tune.py leaves them."""
    generator = compress(handmade_student(channels=(12, 8, 6), dead=([0, 3], [1], [2, 4])))
    run_dir = write_handmade_run(out, "private", generator, extra={"privacy": ledger or private_ledger(),
                                                                    "args": DP_ARGS})
    runtime.save_runtime_artifact(generator, os.path.join(run_dir, runtime.RUNTIME_NAME))
    checkpoint = load_checkpoint(run_dir)
    write_model_card(run_dir, build_card(checkpoint=checkpoint, generator=generator, delta=1e-5, accountant="rdp",
                                         artifacts={}))
    return run_dir


def run_generate(argv) -> int:
    """generate.py's exit code, as its __main__ runs it."""
    return run_script(generate.main, generate.parse_args, argv)


def released(out, *argv) -> str:
    """Run generate.py as its __main__ does; the directory it wrote."""
    assert run_generate(["--out", str(out), "--device", "cpu", *argv]) == 0
    return os.path.realpath(os.path.join(out, "release", "latest"))


def run_without_torch(*argv) -> subprocess.CompletedProcess:
    """generate.py in a fresh interpreter where importing torch fails."""
    code = ("import runpy, sys\nsys.modules['torch'] = None\nsys.argv = ['generate.py'] + sys.argv[1:]\n"
            f"sys.path.insert(0, {ROOT!r})\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\n"
            "finally:\n    assert sys.modules.get('torch') is None\n" % os.path.join(ROOT, "generate.py"))
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


# ---------------------------------------------------------------- the latent vectors without torch

@pytest.mark.parametrize("n,nz,seed", [(40, 16, 0), (7, 13, 5), (3, 100, 2**32 + 7)])  # 91 values: a 16-value tail
def test_numpy_latents_are_the_generators_own_draw(n, nz, seed):
    z, labels = Generator(nz=nz, channels=(4, 4, 4)).sample_inputs(n, generator=torch.Generator().manual_seed(seed))
    z_np, labels_np = latents.sample_inputs(n, nz, 10, seed)
    assert z_np.dtype == np.float32 and np.abs(z_np - z.numpy()).max() < 1e-5
    assert (labels_np == labels.numpy()).all()


# ---------------------------------------------------------------- writing: both formats, the card

def test_both_formats_read_back_balanced_and_labelled_and_the_card_states_the_ledgers_epsilon(tmp_path):
    import torchvision
    assert NAMES == tuple(torchvision.datasets.FashionMNIST.classes)  # the torch-free copies of the built-in names
    assert classes.MNIST_CLASSES == tuple(torchvision.datasets.MNIST.classes)
    run_dir = private_run(tmp_path / "out")
    G = build_generator(load_checkpoint(run_dir))
    pool, pool_labels = generated_pool(G, 50, 3, "cpu", "expected")
    expected = synthetic.to_uint8(pool.numpy())
    png = released(tmp_path / "out", "--run", run_dir, "--num-samples", "50", "--seed", "3")
    folder = torchvision.datasets.ImageFolder(png)
    assert folder.classes == synthetic.class_folder_names(NAMES) and len(folder) == 50
    assert np.bincount(folder.targets).tolist() == [5] * 10
    for path, label in folder.samples:  # file <index>.png holds sample <index> of the seeded draw, its label
        index = int(os.path.basename(path)[:-4])
        assert label == index % 10 == pool_labels[index]
        assert (np.asarray(Image.open(path)) == expected[index, 0]).all()
    npz = released(tmp_path / "out", "--run", run_dir, "--num-samples", "50", "--seed", "3", "--format", "npz")
    with np.load(os.path.join(npz, synthetic.NPZ_NAME)) as data:
        assert data["images"].shape == (50, 28, 28, 1) and data["images"].dtype == np.uint8
        assert (data["images"][..., 0] == expected[:, 0]).all()
        assert data["labels"].dtype == np.int64 and (data["labels"] == np.arange(50) % 10).all()
        assert tuple(data["class_names"]) == NAMES
    value = epsilon(private_ledger(), 1e-5, "rdp")
    for directory in (png, npz):
        card = json.load(open(os.path.join(directory, "dataset.json")))
        assert card["privacy"]["epsilon_total"] == pytest.approx(value) and math.isfinite(value)
        assert card["made"]["seed"] == 3 and card["made"]["num_samples"] == 50
        assert card["per_class"] == {name: 5 for name in NAMES}
        text = open(os.path.join(directory, "DATASET_CARD.md")).read()
        assert f"epsilon = {value:.3f}, delta = 1e-05" in text and "spent no privacy" in text


def test_class_names_are_the_runs_datasets_or_the_given_ones(tmp_path):
    run_dir = private_run(tmp_path / "out", {**private_ledger(), "dataset": "cifar10"})
    named = [json.load(open(os.path.join(released(tmp_path / "out", "--run", run_dir, "--num-samples", "10",
                                                  "--format", "npz", *given), "dataset.json")))["made"]["class_names"]
             for given in ((), ("--class-names", *"abcdefghij"))]
    assert named == [list(classes.CIFAR_CLASSES), list("abcdefghij")]


def test_the_card_says_no_guarantee_plainly_for_a_non_private_run(tmp_path, capsys):
    ledger = private_ledger()
    record_data_read(ledger, "teacher", "private", 400, run="t")
    run_dir = private_run(tmp_path / "out", ledger)
    directory = released(tmp_path / "out", "--run", run_dir, "--num-samples", "20", "--format", "npz")
    card = json.load(open(os.path.join(directory, "dataset.json")))
    assert card["privacy"]["epsilon_total"] == "inf" and not card["privacy"]["guarantee"]
    assert "NO privacy guarantee** (epsilon = inf)" in open(os.path.join(directory, "DATASET_CARD.md")).read()
    assert "WARNING: NO privacy guarantee" in capsys.readouterr().err


def test_once_writes_a_set_once_per_generator_seed_count_and_format(tmp_path, capsys):
    out = tmp_path / "out"
    run_dir = private_run(out)
    first = released(out, "--run", run_dir, "--num-samples", "20", "--once")
    other = released(out, "--run", run_dir, "--num-samples", "20", "--seed", "1", "--once")
    os.remove(out / "release" / "latest")
    before = snapshot(out / "release")
    assert released(out, "--run", run_dir, "--num-samples", "20", "--once") == first  # latest points at it again
    assert "skipped" in capsys.readouterr().out and first != other
    os.remove(out / "release" / "latest")
    assert snapshot(out / "release") == before  # and nothing else was written
    assert released(out, "--run", run_dir, "--num-samples", "20", "--format", "npz", "--once") not in (first, other)


# ---------------------------------------------------------------- the ONNX path: no torch, the same images

def test_a_generator_onnx_alone_writes_the_torch_paths_images_without_torch(tmp_path):
    out = tmp_path / "out"
    run_dir = private_run(out)
    by_torch = released(out, "--run", run_dir, "--num-samples", "64", "--seed", "1", "--format", "npz")
    done = run_without_torch("--onnx", os.path.join(run_dir, runtime.RUNTIME_NAME), "--out", str(out),
                             "--num-samples", "64", "--seed", "1", "--format", "npz")
    assert done.returncode == 0, done.stderr
    by_onnx = os.path.realpath(os.path.join(out, "release", "latest"))
    assert by_onnx != by_torch
    sets = [np.load(os.path.join(d, synthetic.NPZ_NAME)) for d in (by_torch, by_onnx)]
    assert (sets[0]["labels"] == sets[1]["labels"]).all()
    images = [to_unit_range(torch.from_numpy(s["images"])).numpy() for s in sets]
    verdict = runtime.judge(np.abs(images[0] - images[1]), runtime.VerifySettings())
    assert verdict["ok"], verdict
    cards = [json.load(open(os.path.join(d, "dataset.json"))) for d in (by_torch, by_onnx)]
    assert cards[1]["privacy"]["epsilon_total"] == pytest.approx(cards[0]["privacy"]["epsilon_total"])
    alone = tmp_path / "alone"  # without its model card: no guarantee is claimed
    alone.mkdir()
    os.link(os.path.join(run_dir, runtime.RUNTIME_NAME), alone / "generator.onnx")
    done = run_without_torch("--onnx", str(alone / "generator.onnx"), "--out", str(out), "--num-samples", "10")
    assert done.returncode == 0 and "NO privacy guarantee is known" in done.stderr, done.stderr
    card = json.load(open(os.path.join(out, "release", "latest", "dataset.json")))
    assert card["privacy"]["epsilon_total"] == "unknown" and not card["privacy_known"]


# ---------------------------------------------------------------- scoring a set: the run's own numbers

def evaluate_argv(data_root, out, *extra):
    return ["--out", str(out), *tiny_data_args(data_root), "--device", "cpu", "--num-fd-samples", "100",
            "--num-downstream-samples", "240", "--downstream-epochs", "2", "--classifier-epochs", "1",
            "--audit-samples", "100", "--audit-members", "50", "--latency-repeats", "2", "--throughput-repeats", "1",
            "--max-steps", "5", *FP32, *extra]


def scored(argv) -> dict:
    row = json.load(open(os.path.join(evaluate.main(evaluate.parse_args(argv)), "results.json")))["rows"][0]
    return {key: row[key] for key in ("fd", "precision", "recall", "downstream_accuracy")}


def test_scoring_a_set_written_from_a_run_gives_that_runs_numbers(tiny_teacher_run, tiny_data_root, tmp_path,
                                                                  monkeypatch):
    """evaluate.py on the run, its samples rounded to 8 bits as a set holds them, and evaluate.py --synthetic on
    the set generate.py wrote with the same seed and count (the pool's 240 samples): the same numbers."""
    _, teacher = tiny_teacher_run
    out = tmp_path / "out"
    directory = released(out, "--run", teacher, "--num-samples", "240")
    by_set = scored(evaluate_argv(tiny_data_root, out, "--synthetic", directory))

    def as_released(*args, **kwargs):
        images, labels = generated_pool(*args, **kwargs)
        return to_unit_range(torch.from_numpy(synthetic.to_uint8(images.numpy()))), labels
    monkeypatch.setattr(evaluate, "generated_pool", as_released)
    by_run = scored(evaluate_argv(tiny_data_root, out, "--runs", teacher))
    assert by_set == by_run


# ---------------------------------------------------------------- refusals: one line, exit 2, nothing written

def refused(code_of, out, capsys) -> str:
    before = snapshot(out)
    try:
        code = code_of()
    except SystemExit as exc:  # argparse
        code = exc.code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("WARNING")]
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert snapshot(out) == before
    return err[0]


FOLDERS = synthetic.class_folder_names(NAMES)


def write_folder(root, names=FOLDERS, size=28, mode="L", per_class=24):
    """An ImageFolder tree of plain images, 24 per class by default: the 240 the settings take."""
    for label, name in enumerate(names):
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            Image.new(mode, (size, size), 40 * label).save(os.path.join(root, name, f"{label * per_class + i}.png"))
    return str(root)


def write_npz(path, size=28, names=NAMES, count=240):
    np.savez(path, images=np.zeros((count, size, size, 1), np.uint8), labels=np.arange(count) % 10,
             class_names=np.array(names))
    return str(path)


BAD_SETS = {"size": (lambda d: write_folder(d / "set", size=32),
                     "32x32 with 1 channel, the data's are 28x28 with 1 channel"),
            "channels": (lambda d: write_folder(d / "set", mode="RGB"),
                         "28x28 with 3 channels, the data's are 28x28 with 1 channel"),
            "classes": (lambda d: write_folder(d / "set", FOLDERS[:9] + ["9-Boot"]), "do not match the data's classes"),
            "npz-shape": (lambda d: write_npz(d / "set.npz", size=32), "its images are 32x32 with 1 channel"),
            "npz-classes": (lambda d: write_npz(d / "set.npz", names=NAMES[::-1]), "are not the data's"),
            "too-few": (lambda d: write_folder(d / "set", per_class=2), "holds 20 images, but FD takes 100")}


@pytest.mark.parametrize("case", list(BAD_SETS))
def test_evaluate_refuses_a_set_of_another_shape_or_classes(case, tiny_data_root, tmp_path, capsys):
    write, expected = BAD_SETS[case]
    out = tmp_path / "out"
    out.mkdir()
    argv = evaluate_argv(tiny_data_root, out, "--synthetic", write(tmp_path))
    assert expected in refused(lambda: run_script(evaluate.main, evaluate.parse_args, argv), out, capsys)


def test_generate_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    ledger = private_ledger()
    record_audit(ledger, "private", "x", {"canaries": 4, "kind": "generated", "included": 2, "seed": 0})
    audit_run, good_run = private_run(out, ledger), private_run(out)
    cases = [(["--run", audit_run], "audit run"),
             (["--run", good_run, "--class-names", "a", "b"], "2 class names for a generator of 10 classes"),
             (["--onnx", str(tmp_path / "missing.onnx")], "no such file"),
             (["--onnx", os.path.join(good_run, "model_card.json")], "ONNX Runtime cannot load it"),
             (["--run", str(tmp_path / "nowhere")], "no such file or directory"),
             (["--run", good_run, "--format", "gif"], "invalid choice"),
             (["--run", good_run, "--num-samples", "0"], "not a positive integer")]
    for argv, expected in cases:
        assert expected in refused(lambda: run_generate(["--out", str(out), *argv]), out, capsys), argv
    assert not os.path.exists(out / "release")
