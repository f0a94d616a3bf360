"""The demo page's folder: the private generator in a web page, run by the browser (docs/DESIGN.md, "The demo page").

`write_demo(run_dir, demo_dir)` writes a self-contained static folder that any web server can serve:

    index.html, demo.js      the page (copied from the repository's demo/ folder; no build step)
    generator.onnx           the run's artifact, byte for byte
    demo.json                shape, class names, the model card's essentials in plain words, the check's settings
    check_z.bin, check_labels.bin, check_expected.bin
                             the fixed latent vectors and labels of samples.png (`utils.gan.steps.fixed_inputs`),
                             float32 / int64, and the images the Python runtime (`ort_runner.py`) made of them
    ort/                     onnxruntime-web's WebAssembly build, from the npm package pinned in demo/package.json

The page runs the check set itself and shows its largest difference to the Python runtime's images, judged with
the artifact check's tolerances (`utils.compression.runtime.VerifySettings`). `make_server` serves the folder on
localhost with Python's http.server; `served_page` opens it in headless Chromium (`utils/evaluation/headless.py`)
and `check_offline` runs the check set there with the server stopped (make_demo.py --check, tests/test_demo.py).
"""
import argparse
import base64
import contextlib
import functools
import http.server
import io
import json
import math
import os
import shutil
import threading
import types

import numpy as np
from PIL import Image

from utils.compression.ort_runner import generate, load_session, metadata
from utils.compression.runtime import RUNTIME_NAME, VerifySettings
from utils.data.classes import class_names
from utils.evaluation.headless import Chromium
from utils.evaluation.model_card import CARD_JSON, build_card
from utils.gan.steps import fixed_inputs
from utils.privacy.dp import add_dp_args
from utils.run.checkpoint import build_generator, load_checkpoint
from utils.run.cli import UserError
from utils.run.files import write_json

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE_SOURCES = os.path.join(REPO, "demo")  # index.html, demo.js, package.json (the pinned onnxruntime-web)
PAGE_FILES = ("index.html", "demo.js")
ORT_PACKAGE = os.path.join(PAGE_SOURCES, "node_modules", "onnxruntime-web")
# The wasm-only build: its loader script, the module it imports, and the WebAssembly binary.
ORT_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
CHECK_FILES = {"z": "check_z.bin", "labels": "check_labels.bin", "expected": "check_expected.bin"}
# file types the page needs served right: a module script must be JavaScript, WebAssembly streams only as wasm
MIME_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
              ".json": "application/json", ".onnx": "application/octet-stream", ".bin": "application/octet-stream"}


def ort_web() -> tuple:
    """(dist folder, version) of the installed onnxruntime-web (`make demo-tools` installs it), or None."""
    manifest = os.path.join(ORT_PACKAGE, "package.json")
    dist = os.path.join(ORT_PACKAGE, "dist")
    if not os.path.isfile(manifest) or not all(os.path.isfile(os.path.join(dist, f)) for f in ORT_FILES):
        return None
    with open(manifest) as handle:
        return dist, json.load(handle)["version"]


# ---------------------------------------------------------------- what the page shows

def run_card(checkpoint: dict) -> dict:
    """The run's model card: the one stage 5 wrote (model_card.json), else one built from the checkpoint's ledger
    (a compact or teacher run) at fine_tune.py's default delta and accountant unless the run's args name them."""
    path = os.path.join(checkpoint["run_dir"], CARD_JSON)
    if os.path.isfile(path):
        with open(path) as handle:
            return json.load(handle)
    defaults = argparse.ArgumentParser()
    add_dp_args(defaults, 0.0)
    args = checkpoint["args"]
    return build_card(checkpoint=checkpoint, generator=build_generator(checkpoint), artifacts={},
                      delta=args.get("delta") or defaults.get_default("delta"),
                      accountant=args.get("accountant") or defaults.get_default("accountant"))


def _epsilon_words(epsilon, delta: float) -> str:
    epsilon = float(epsilon)
    factor = math.exp(epsilon)
    factor = f"{factor:,.0f}" if factor < 1e6 else f"{factor:.2g}"
    return (f"epsilon {epsilon:.2f}, delta {delta:g}: adding or removing any one image (with its label) of that split "
            f"changes the probability of anything this model produces (its weights, this file, every image on this "
            f"page) by at most a factor e^{epsilon:.2f} (about {factor}), plus {delta:g}.")


def card_lines(card: dict, model_bytes: int) -> list:
    """The model card's essentials in plain words: the guarantee and what it is about, the public data, the model."""
    privacy, data, model = card["privacy"], card["data"], card["model"]
    size, dataset = data.get("private_split_size"), data.get("dataset")
    if privacy["guarantee"] and privacy["epsilon_total"] != "inf":
        lines = [f"Differentially private with respect to the {size:,} images of the private split of {dataset} "
                 f"(fingerprint {data.get('private_fingerprint')}).",
                 _epsilon_words(privacy["epsilon_total"], privacy["delta"])]
    else:
        lines = ["NO differential-privacy guarantee (epsilon is infinite).", privacy["statement"]]
    public = ", ".join(f"{p['size']:,} images of the {p['split']} split ({p['stage']})" for p in privacy["public_data"])
    lines.append(f"Public data that also shaped the model, not covered by the guarantee: {public or 'none'}.")
    lines.append(f"The model: {RUNTIME_NAME}, {model_bytes:,} bytes, {model['bits']}-bit integer weights, "
                 f"{model['parameters']:,} parameters (run {model['run_dir']}).")
    lines.append("The training noise came from a non-cryptographic random generator (see the model card).")
    return lines


# ---------------------------------------------------------------- the folder

def check_set(session, per_class: int = 10) -> dict:
    """The fixed inputs of samples.png (z, labels) and the Python runtime's images of them."""
    info = metadata(session)
    shape = types.SimpleNamespace(nz=int(info["nz"]), num_classes=int(info["num_classes"]))
    z, labels = fixed_inputs(shape, per_class=per_class)
    z, labels = z.numpy().astype(np.float32), labels.numpy().astype(np.int64)
    return {"z": z, "labels": labels, "expected": generate(session, z, labels).astype(np.float32),
            "columns": per_class}


def model_shape(session) -> dict:
    info, (_, channels, size, _) = metadata(session), session.get_outputs()[0].shape
    return {"nz": int(info["nz"]), "num_classes": int(info["num_classes"]), "image_size": int(size),
            "channels": int(channels), "bits": int(info["bits"])}


def copy_runtime(demo_dir: str, ort: tuple):
    dist, _ = ort
    os.makedirs(os.path.join(demo_dir, "ort"), exist_ok=True)
    for name in ORT_FILES:
        shutil.copyfile(os.path.join(dist, name), os.path.join(demo_dir, "ort", name))


def write_demo(run_dir: str, demo_dir: str = None, names=None, ort: tuple = None) -> dict:
    """Write the demo folder of `run_dir` (default `<run_dir>/demo`); returns demo.json's content (with `dir`).
    `ort` is (dist folder, version) of onnxruntime-web (default: the installed one)."""
    checkpoint = load_checkpoint(run_dir)
    model = os.path.join(checkpoint["run_dir"], RUNTIME_NAME)
    if not os.path.isfile(model):
        raise UserError(f"{run_dir}: no {RUNTIME_NAME} there (stages 4 and 5 write it)")
    ort = ort or ort_web()
    if ort is None:
        raise UserError(f"onnxruntime-web is not installed in {os.path.relpath(ORT_PACKAGE, REPO)}: run make "
                        f"demo-tools (npm ci in demo/)")
    demo_dir = demo_dir or os.path.join(checkpoint["run_dir"], "demo")
    os.makedirs(demo_dir, exist_ok=True)
    session = load_session(model)
    shape, check = model_shape(session), check_set(session)
    for key, name in CHECK_FILES.items():
        check[key].tofile(os.path.join(demo_dir, name))
    shutil.copyfile(model, os.path.join(demo_dir, RUNTIME_NAME))
    for name in PAGE_FILES:
        shutil.copyfile(os.path.join(PAGE_SOURCES, name), os.path.join(demo_dir, name))
    copy_runtime(demo_dir, ort)
    settings = VerifySettings()
    config = {**shape, "model": RUNTIME_NAME, "model_bytes": os.path.getsize(model), "runtime_version": ort[1],
              "class_names": class_names(checkpoint, shape["num_classes"], names),
              "card": {"lines": card_lines(run_card(checkpoint), os.path.getsize(model))},
              "check": {**CHECK_FILES, "count": len(check["labels"]), "columns": check["columns"],
                        "python_runtime": f"onnxruntime {ort_python_version()}", "tolerance": settings.tolerance,
                        "pixel_share": settings.pixel_share, "mean_tolerance": settings.mean_tolerance}}
    write_json(os.path.join(demo_dir, "demo.json"), config)
    return {**config, "dir": demo_dir}


def ort_python_version() -> str:
    import onnxruntime
    return onnxruntime.__version__


def read_check_set(demo_dir: str) -> dict:
    """The check set as written (z, labels, expected images), shaped by demo.json."""
    with open(os.path.join(demo_dir, "demo.json")) as handle:
        config = json.load(handle)
    n, size, channels = config["check"]["count"], config["image_size"], config["channels"]
    read = {"z": (np.float32, (n, config["nz"])), "labels": (np.int64, (n,)),
            "expected": (np.float32, (n, channels, size, size))}
    return {key: np.fromfile(os.path.join(demo_dir, CHECK_FILES[key]), dtype).reshape(shape)
            for key, (dtype, shape) in read.items()}


# ---------------------------------------------------------------- serving

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME_TYPES}

    def log_message(self, *args):  # one line per file fetched is noise here
        pass


def make_server(demo_dir: str, port: int = 0, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """An http.server serving `demo_dir` on host:port (0: a free port); call serve_forever() on it."""
    handler = functools.partial(_QuietHandler, directory=demo_dir)
    return http.server.ThreadingHTTPServer((host, port), handler)


def address(server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def stop(server):
    """Stop serving and close the socket: from here on the page can fetch nothing."""
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------- the page in headless Chromium

@contextlib.contextmanager
def served_page(demo_dir: str, width: int = 1000, timeout: float = 60.0):
    """`demo_dir` served on a free localhost port and opened in headless Chromium; yields (browser, server)."""
    server = make_server(demo_dir)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Chromium(width=width, timeout=timeout) as browser:
            browser.open(address(server))
            yield browser, server
    finally:
        stop(server)


def page_state(browser) -> dict:
    """What the page holds now: its last images as the model returned them (float32, flat) and its canvas (RGB)."""
    images = np.frombuffer(base64.b64decode(browser.evaluate("demo.lastImagesBase64()")), np.float32)
    png = browser.evaluate("document.getElementById('grid').toDataURL('image/png')")
    canvas = Image.open(io.BytesIO(base64.b64decode(png.split(",", 1)[1]))).convert("RGB")
    return {"images": images, "canvas": np.asarray(canvas)}


def check_offline(browser, server) -> dict:
    """Wait until the page has loaded everything (and run its check set once), stop the server, then run the check
    set again, offline: {"ready", "check"} as the page reports them, and `page_state` after the check."""
    ready = browser.evaluate("demo.ready")
    stop(server)
    return {"ready": ready, "check": browser.evaluate("demo.check()"), **page_state(browser)}
