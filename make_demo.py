"""The private generator in a web page: write a run's demo folder and serve it on localhost (docs/DESIGN.md, "The
demo page").

Reads any run with a `generator.onnx` (default: <out>/private/latest, the DP fine-tuned generator) and writes
<run>/demo/ (utils/evaluation/web_demo.py): the page, the model, demo.json (class names, the model card's
essentials in plain words), the fixed latent vectors and labels of samples.png with the images the Python runtime
made of them, and onnxruntime-web's WebAssembly files from demo/node_modules (`make demo-tools` installs the
version pinned in demo/package-lock.json). Then it serves the folder with Python's http.server and prints the
address: open it in a browser, pick a class, press generate; the page runs the check set when it loads and shows
its largest difference to the Python runtime's images.

--check opens the page in headless Chromium, stops the server once the page has loaded (the rest runs offline),
runs the check set in the browser and prints its verdict (exit 1 when the images differ beyond the artifact
check's tolerance) and the times of PRESSES presses of generate; --screenshot PATH also saves a PNG of the page.
"""
import argparse
import json
import statistics
import sys

import numpy as np

from utils.compression.runtime import VerifySettings, judge
from utils.evaluation.headless import BrowserError, find_chromium
from utils.evaluation.web_demo import (address, check_offline, make_server, read_check_set, served_page, stop,
                                       write_demo)
from utils.run.checkpoint import input_run
from utils.run.cli import UserError, make_parser, positive_int, run_script

# The run whose page is written, editable here: None means <out>/private/latest; --run overrides it.
RUN_DIR = None
PRESSES = 5  # --check: presses of generate timed in the browser (their median is the number to quote)


def parse_args(argv=None):
    parser = make_parser(__doc__, "python make_demo.py                       # <out>/private/latest, serve on :8000\n"
                                  "  python make_demo.py --run checkpoints/compact/latest --no-serve --check "
                                  "--screenshot docs/demo.png")
    parser.add_argument("--run", default=None, metavar="RUN",
                        help="run directory with a generator.onnx; default: RUN_DIR at the top of this script if set, "
                             "else <out>/private/latest (this flag wins over both)")
    parser.add_argument("--out", default="checkpoints", help="root of all pipeline outputs")
    parser.add_argument("--demo-dir", default=None, help="where to write the page (default: <run>/demo)")
    parser.add_argument("--class-names", nargs="+", default=None, metavar="NAME",
                        help="names of the classes, label 0 first (default: the dataset's, or its folder names)")
    parser.add_argument("--serve", action=argparse.BooleanOptionalAction, default=True,
                        help="serve the folder on localhost until Ctrl-C")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on")
    parser.add_argument("--port", type=positive_int, default=8000, help="port to serve on")
    parser.add_argument("--check", action="store_true",
                        help="run the page's check set in headless Chromium, offline once loaded, and print it")
    parser.add_argument("--screenshot", default=None, metavar="PNG", help="with the check: save the page as a PNG")
    return parser.parse_args(argv)


def browser_check(demo_dir: str, screenshot: str = None) -> dict:
    """The page's check set run in headless Chromium with the server stopped, judged again here on the images the
    browser returned (utils.compression.runtime.judge, the artifact check's tolerances), then PRESSES presses of
    generate (100 images of all classes each; the screenshot shows the last) and their times."""
    if not find_chromium():
        raise UserError("no chromium found: `make demo-tools` installs it (apt-get install chromium)")
    try:
        with served_page(demo_dir) as (browser, server):
            result = check_offline(browser, server)
            presses = [browser.evaluate("demo.generate('all', 100)") for _ in range(PRESSES)]  # offline too
            if screenshot:
                browser.screenshot(screenshot)
    except BrowserError as exc:
        raise UserError(f"the page failed in headless Chromium: {exc}") from exc
    expected = read_check_set(demo_dir)["expected"]
    diff = np.abs(result["images"] - expected.ravel()) if result["images"].size == expected.size else np.inf
    return {"page": result["check"], "judged_here": judge(np.atleast_1d(diff), VerifySettings()),
            "generate": {"tiles": presses[-1]["tiles"], "presses": PRESSES,
                         "median_ms": statistics.median(p["ms"] for p in presses),
                         "ms": [p["ms"] for p in presses]}}


def serve(demo_dir: str, host: str, port: int):
    try:
        server = make_server(demo_dir, port, host)
    except OSError as exc:
        raise UserError(f"cannot serve on {host}:{port} ({exc.strerror}): choose another --port "
                        f"(make demo PORT=...)") from exc
    print(f"serving {demo_dir} at {address(server)} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop(server)


def main(args) -> dict:
    run_dir = input_run(args.run, RUN_DIR, args.out, "private")
    config = write_demo(run_dir, args.demo_dir, args.class_names)
    print(f"wrote {config['dir']}: {config['image_size']}x{config['image_size']}, {config['channels']} channel(s), "
          f"{config['num_classes']} classes, {config['model_bytes']} bytes of model, onnxruntime-web "
          f"{config['runtime_version']}")
    if args.check or args.screenshot:
        verdict = browser_check(config["dir"], args.screenshot)
        print(json.dumps(verdict))
        if not (verdict["page"]["pass"] and verdict["judged_here"]["ok"]):
            print("DEMO CHECK FAILED: the browser's images differ from the Python runtime's", file=sys.stderr)
            raise SystemExit(1)
    if args.serve:
        serve(config["dir"], args.host, args.port)
    return config


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
