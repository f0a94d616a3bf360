"""The demo page (make_demo.py, utils/evaluation/web_demo.py, demo/): the folder it writes, and the page itself run
by headless Chromium against the Python runtime's images (skipped, with the reason, where chromium or npm is
absent). The generators are hand-made (random weights, no training): 28 px grey, 32 px RGB at 4 bits, 64 px RGB."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import make_demo
from conftest import ROOT, handmade_student, tiny_ledger, write_handmade_run
from utils.compression.ort_runner import generate, load_session
from utils.compression.runtime import RUNTIME_NAME, VerifySettings, judge, save_runtime_artifact
from utils.data import classes
from utils.evaluation import web_demo
from utils.evaluation.headless import find_chromium
from utils.gan.steps import fixed_inputs
from utils.privacy.ledger import epsilon, record_data_read, record_mechanism
from utils.run.cli import UserError

FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
SHAPES = {"28-grey": {},
          "32-rgb-4bit": {"channels": (12, 8, 6, 4), "image_size": 32, "image_channels": 3, "bits": 4},
          "64-rgb": {"channels": (12, 8, 6, 4, 4), "image_size": 64, "image_channels": 3}}
GAP = 2  # demo.js: white pixels between tiles


def compare_cases() -> dict:
    """(images, expected) pairs of 1,000 pixels for the page's verdict: one pixel off by 0.3 (within the 1 % share
    and the mean), twelve off by 0.06 (1.2 %, the mean still within), every pixel off by 0.002 (the mean), a NaN."""
    base = np.linspace(-0.9, 0.9, 1000).astype(np.float32)
    def off(indices, by):
        images = base.copy()
        images[indices] += by
        return images, base
    return {"one-outlier": off([777], 0.3), "twelve-outliers": off(np.arange(12) * 80, 0.06),
            "shifted": off(slice(None), 0.002), "not-a-number": off([9], np.nan)}


COMPARE_CASES = compare_cases()


def private_ledger() -> dict:
    """Two DP mechanisms (a DP teacher's and a fine-tuning's) and the public data of a teacher."""
    ledger = tiny_ledger()
    record_mechanism(ledger, "teacher", 1.0, 0.05, 100, 1.0, "prv", run="00000-t")
    record_mechanism(ledger, "private", 1.5, 0.05, 50, 1.0, "prv", run="00000-p")
    record_data_read(ledger, "teacher", "public", 200, run="00000-t")
    return ledger


def demo_run(out, ledger=None, **shape) -> tuple:
    """(run dir, generator) of a hand-made compact run with its generator.onnx."""
    generator = handmade_student(**shape)
    run_dir = write_handmade_run(out, "compact", generator, extra={"privacy": ledger or private_ledger()})
    save_runtime_artifact(generator, os.path.join(run_dir, RUNTIME_NAME))
    return run_dir, generator


@pytest.fixture
def fake_ort(tmp_path):
    """A stand-in for onnxruntime-web's files (the folder tests need no npm)."""
    dist = tmp_path / "ort-dist"
    dist.mkdir()
    for name in web_demo.ORT_FILES:
        (dist / name).write_text(f"// {name}")
    return str(dist), "0.0.0-test"


# ---------------------------------------------------------------- the folder

def test_demo_folder_holds_the_page_the_model_and_the_check_set_of_samples_png(tmp_path, fake_ort):
    run_dir, generator = demo_run(tmp_path / "out")
    config = web_demo.write_demo(run_dir, ort=fake_ort)
    demo = config["dir"]
    assert demo == os.path.join(run_dir, "demo")
    for name in (*web_demo.PAGE_FILES, RUNTIME_NAME, "demo.json", *web_demo.CHECK_FILES.values()):
        assert os.path.isfile(os.path.join(demo, name)), name
    for name in web_demo.ORT_FILES:
        assert Path(demo, "ort", name).read_text() == f"// {name}"
    model = Path(run_dir, RUNTIME_NAME).read_bytes()
    assert Path(demo, RUNTIME_NAME).read_bytes() == model
    assert json.loads(Path(demo, "demo.json").read_text()) == {k: v for k, v in config.items() if k != "dir"}
    assert (config["nz"], config["num_classes"], config["image_size"], config["channels"], config["model_bytes"],
            config["runtime_version"]) == (16, 10, 28, 1, len(model), "0.0.0-test")
    assert config["class_names"] == FASHION_NAMES

    # the fixed inputs of samples.png, and the Python runtime's images of them
    check = web_demo.read_check_set(demo)
    z, labels = fixed_inputs(generator)
    assert np.array_equal(check["z"], z.numpy()) and np.array_equal(check["labels"], labels.numpy())
    assert config["check"]["columns"] * generator.num_classes == config["check"]["count"] == len(labels)
    session = load_session(os.path.join(run_dir, RUNTIME_NAME))
    assert np.array_equal(check["expected"], generate(session, check["z"], check["labels"]))
    with torch.no_grad():
        model_images = generator.eval()(z, labels).numpy()
    assert judge(np.abs(check["expected"] - model_images), VerifySettings())["ok"]
    settings = VerifySettings()
    assert (config["check"]["tolerance"], config["check"]["pixel_share"], config["check"]["mean_tolerance"]) == (
        settings.tolerance, settings.pixel_share, settings.mean_tolerance)


def test_card_lines_state_the_total_epsilon_the_private_split_and_the_bytes(tmp_path, fake_ort):
    ledger = private_ledger()
    run_dir, _ = demo_run(tmp_path / "out", ledger=ledger)
    lines = web_demo.write_demo(run_dir, ort=fake_ort)["card"]["lines"]
    total = epsilon(ledger, 1e-5, "prv")
    assert lines[0].startswith("Differentially private with respect to the 400 images of the private split of "
                               "fashion-mnist (fingerprint f00d)")
    assert f"epsilon {total:.2f}, delta 1e-05" in lines[1]
    assert "200 images of the public split (teacher)" in lines[2]
    assert f"{os.path.getsize(os.path.join(run_dir, RUNTIME_NAME)):,} bytes, 8-bit integer weights" in lines[3]


def test_a_stored_model_card_is_used_and_a_non_dp_read_means_no_guarantee(tmp_path, fake_ort):
    ledger = private_ledger()
    record_data_read(ledger, "teacher", "private", 400, run="00000-t")
    run_dir, _ = demo_run(tmp_path / "out", ledger=ledger)
    lines = web_demo.write_demo(run_dir, ort=fake_ort)["card"]["lines"]
    assert lines[0] == "NO differential-privacy guarantee (epsilon is infinite)."
    assert "read the private split without DP" in lines[1]

    card = web_demo.run_card(web_demo.load_checkpoint(run_dir))
    card["privacy"]["statement"] = "the card stage 5 wrote"
    with open(os.path.join(run_dir, web_demo.CARD_JSON), "w") as handle:
        json.dump(card, handle)
    assert web_demo.write_demo(run_dir, ort=fake_ort)["card"]["lines"][1] == "the card stage 5 wrote"


def test_class_names_of_a_folder_given_names_and_the_fallback(tmp_path, fake_ort):
    root = tmp_path / "shapes"
    for name in ("circle", "square", "triangle"):
        (root / name).mkdir(parents=True)
        for image in ("a.png", "b.png"):  # only listed, never decoded
            (root / name / image).write_bytes(b"")
    ledger = {**tiny_ledger(), "dataset": "folder"}
    generator = handmade_student()
    run_dir = write_handmade_run(tmp_path / "out", "compact", generator,
                                 extra={"privacy": ledger, "args": {"data_root": str(root)}})
    checkpoint = web_demo.load_checkpoint(run_dir)
    assert classes.dataset_class_names(checkpoint) == ["circle", "square", "triangle"]
    # ten classes in the model, three folders: the folder is not the model's data any more
    assert classes.class_names(checkpoint, 10) == [f"class {i}" for i in range(10)]
    assert classes.class_names(checkpoint, 3) == ["circle", "square", "triangle"]
    assert classes.class_names(checkpoint, 3, ["a", "b", "c"]) == ["a", "b", "c"]


def test_a_run_without_artifact_or_without_onnxruntime_web_is_a_one_line_error(tmp_path, fake_ort, monkeypatch):
    generator = handmade_student()
    bare = write_handmade_run(tmp_path / "out", "compact", generator)
    with pytest.raises(UserError, match=f"no {RUNTIME_NAME} there"):
        web_demo.write_demo(bare, ort=fake_ort)
    run_dir, _ = demo_run(tmp_path / "other")
    monkeypatch.setattr(web_demo, "ort_web", lambda: None)
    assert make_demo.run_script(make_demo.main, make_demo.parse_args, ["--run", run_dir, "--no-serve"]) == 2
    assert not os.path.exists(os.path.join(run_dir, "demo"))


# ---------------------------------------------------------------- the page in headless Chromium

@pytest.fixture(scope="module")
def ort_web_files():
    """onnxruntime-web as `make demo-tools` installs it (npm ci in demo/ when npm is there); else skip, saying why."""
    if not find_chromium():
        pytest.skip("no chromium on PATH: `make demo-tools` installs it (apt-get install chromium)")
    found = web_demo.ort_web()
    if found is None and shutil.which("npm"):
        subprocess.run(["make", "--no-print-directory", "demo/node_modules/.package-lock.json"], cwd=ROOT,
                       capture_output=True, timeout=600, check=False)
        found = web_demo.ort_web()
    if found is None:
        pytest.skip("onnxruntime-web is not installed and npm is absent or could not install it: `make demo-tools`")
    return found


def js_round(values: np.ndarray) -> np.ndarray:
    """demo.js's pixel: Math.round((v + 1) * 127.5) clamped to 0..255 (Math.round rounds halves up)."""
    return np.clip(np.floor((values.astype(np.float64) + 1) * 127.5 + 0.5), 0, 255).astype(np.uint8)


def canvas_tiles(canvas: np.ndarray, size: int, count: int, columns: int) -> np.ndarray:
    """The (count, size, size, 3) tiles of the page's grid, GAP white pixels apart."""
    rows = -(-count // columns)
    assert canvas.shape == (rows * (size + GAP) - GAP, columns * (size + GAP) - GAP, 3)
    step = size + GAP
    return np.stack([canvas[(i // columns) * step:(i // columns) * step + size,
                            (i % columns) * step:(i % columns) * step + size] for i in range(count)])


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_page_runs_the_generator_offline_and_matches_the_python_runtime(tmp_path, ort_web_files, shape):
    run_dir, _ = demo_run(tmp_path / "out", **SHAPES[shape])
    config = web_demo.write_demo(run_dir, ort=ort_web_files)
    size, channels, count = config["image_size"], config["channels"], config["check"]["count"]
    expected = web_demo.read_check_set(config["dir"])["expected"]
    with web_demo.served_page(config["dir"]) as (browser, server):
        result = web_demo.check_offline(browser, server)  # from here on the server is stopped
        page = {"options": browser.evaluate("[...document.getElementById('class').options].map(o => o.text)"),
                "card": browser.evaluate("[...document.querySelectorAll('#card li')].map(li => li.textContent)"),
                "shown_max": browser.evaluate("Number(document.getElementById('check').dataset.maxDiff)"),
                "timing": browser.evaluate("document.getElementById('timing').textContent")}
        verdicts = {name: browser.evaluate(f"demo.compare({json.dumps(a.tolist())}, {json.dumps(b.tolist())})")
                    for name, (a, b) in COMPARE_CASES.items()}
        pressed = [browser.evaluate("demo.generate(3, 20)") for _ in range(2)]
        fresh = [web_demo.page_state(browser)["images"]]
        browser.evaluate("demo.generate(3, 20)")
        fresh.append(web_demo.page_state(browser)["images"])

    # the page loaded the model, shows the class picker and the card's essentials
    assert result["ready"]["loaded"] and result["ready"]["modelBytes"] == config["model_bytes"]
    assert page["options"] == ["all classes", *config["class_names"]]
    assert page["card"] == config["card"]["lines"]
    assert "ms per image in this browser" in page["timing"]

    # the check set's grid: one tile per image, each the browser's image, not blank, not all alike
    images = result["images"].reshape(expected.shape)
    assert result["check"]["tiles"] == count == len(expected)
    tiles = canvas_tiles(result["canvas"], size, count, config["check"]["columns"])
    drawn = js_round(images).transpose(0, 2, 3, 1)
    assert np.array_equal(tiles, np.broadcast_to(drawn, tiles.shape) if channels == 1 else drawn)
    assert images.reshape(count, -1).std(axis=1).min() > 0.01
    assert np.abs(images - images[:1]).reshape(count, -1).max(axis=1)[1:].min() > 0.01

    # the browser's images are the Python runtime's, within the artifact check's tolerance; the page says so
    verdict = judge(np.abs(images - expected), VerifySettings())
    assert verdict["ok"] and result["check"]["pass"]
    assert page["shown_max"] == pytest.approx(verdict["max_abs_diff"], rel=1e-6, abs=1e-12)
    # the page's verdict is the artifact check's (`judge`) on constructed differences
    for name, (images_, expected_) in COMPARE_CASES.items():
        want = judge(np.abs(images_ - expected_), VerifySettings())
        assert verdicts[name]["pass"] == want["ok"] == (name == "one-outlier"), name
        if name != "not-a-number":
            assert verdicts[name]["maxDiff"] == pytest.approx(want["max_abs_diff"], rel=1e-6), name
            assert verdicts[name]["over"] == want["pixels_over_tolerance"], name

    # offline, a press of generate draws fresh samples of the chosen class
    assert [p["tiles"] for p in pressed] == [20, 20] and all(p["labels"] == [3] * 20 for p in pressed)
    assert fresh[0].size == 20 * channels * size * size and np.abs(fresh[0] - fresh[1]).max() > 0.01
