"""Command-line conventions shared by every script (docs/DESIGN.md, "Scripts and the command line").

`UserError` is a problem with the user's input (a path, a checkpoint, a number): `run_script` turns it into one
line on stderr and exit code 2, never a traceback.

torch is imported inside the functions that use it: generate.py's --onnx path parses its flags and reports its errors
here in a process without torch (tests/test_generate.py).
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
from tqdm import tqdm

# progress reports when the output is a file, not a terminal: one line every this many seconds
LOG_INTERVAL_S = 30


class UserError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


class NothingToDo(Exception):
    """With --once, a run of this stage already finished with these settings: the stage ends here, exit code 0."""


def set_seed(seed: int):
    """Seed Python, NumPy and torch's global generators (models are initialised from torch's)."""
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str):
    """The torch.device that --device names (auto: CUDA, else MPS, else the CPU)."""
    import torch
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda[:N] or mps") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def _checked(convert, predicate, description):
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {description}")
        if not predicate(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {description}")
        return value
    parse.__name__ = description
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
nonnegative_float = _checked(float, lambda v: v >= 0 and math.isfinite(v), "a non-negative number")
open_unit_float = _checked(float, lambda v: 0 < v < 1, "a number in (0, 1)")
quant_bits = _checked(int, lambda v: 2 <= v <= 8 or v in (16, 32), "a bit width in 2-8, 16 or 32")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (but None, which the help text explains), description and examples kept as written."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line on stderr and exit code 2 (no usage block)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def make_parser(description: str, example: str) -> argparse.ArgumentParser:
    return OneLineParser(description=description, epilog=f"example:\n  {example}", formatter_class=_Formatter)


def add_common_args(parser: argparse.ArgumentParser, max_steps: bool = True):
    """The flags every script has; `max_steps=False` for a script that takes no steps (generate.py)."""
    group = parser.add_argument_group("common")
    group.add_argument("--seed", type=int, default=0, help="random seed")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps")
    group.add_argument("--out", default="checkpoints", help="root of all pipeline outputs")
    group.add_argument("--desc", default=None, help="suffix of the run directory name (default: from the settings)")
    if max_steps:
        group.add_argument("--max-steps", type=positive_int, default=None,
                           help="stop after this many optimiser steps or batches (quick runs and tests)")
    group.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    group.add_argument("--once", action="store_true",
                       help="(stage scripts) run this stage once for these settings: skip it when a run under --out "
                            "finished with the same settings and inputs (`latest` then points at it), continue an "
                            "interrupted one as --resume would, else start (make pipeline, make reproduce)")
    group.add_argument("--pipeline-stage", default=None, metavar="K/N",
                       help="this stage's place in a pipeline: printed with the script's name when it starts and, "
                            "with its elapsed time, when it ends (make pipeline, make reproduce)")


def add_input_arg(group, flag: str, constant: str, what: str, fallback: str):
    """The flag naming an earlier stage's run. Its default is the script's editable constant `constant` (a
    clearly marked `..._DIR = None` near the top), else `fallback`; the flag wins over both."""
    group.add_argument(flag, default=None, metavar="RUN",
                       help=f"{what}; default: {constant} at the top of this script if set, else {fallback} "
                            f"(this flag wins over both)")


def add_speed_args(parser: argparse.ArgumentParser):
    """The timing settings of the cost report (stages 4 and 5)."""
    group = parser.add_argument_group("cost report")
    group.add_argument("--latency-repeats", type=positive_int, default=50, help="timed batch-1 calls per model")
    group.add_argument("--throughput-repeats", type=positive_int, default=10, help="timed big-batch calls per model")
    group.add_argument("--throughput-batch", type=positive_int, default=256, help="batch size of the throughput test")
    group.add_argument("--threads", type=nonnegative_int, default=0,
                       help="CPU threads for the timings (0: torch's default)")


def speed_settings(args) -> dict:
    """utils.compression.cost.measure_speed's keyword arguments from `add_speed_args`' flags."""
    return {"latency_repeats": args.latency_repeats, "throughput_repeats": args.throughput_repeats,
            "throughput_batch": args.throughput_batch}


def set_threads(threads: int):
    """torch's CPU threads for timings; 0 keeps torch's default."""
    if threads:
        import torch
        torch.set_num_threads(threads)


def add_snapshot_arg(group):
    group.add_argument("--snapshot-steps", type=positive_int, nargs="+", default=None, metavar="STEP",
                       help="also keep the checkpoint of these steps, as snapshot-<step>.pt in the run directory "
                            "(evaluate.py --runs reads them; learning curves: benchmarks/learning_curve.py)")


def add_resume_arg(parser: argparse.ArgumentParser):
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_DIR",
                        help="continue a run from its last checkpoint (default: this stage's latest run)")


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """tqdm as every script uses it: live on a terminal, one report every LOG_INTERVAL_S seconds in a log file."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def print_config(args):
    print(json.dumps(vars(args), indent=2, sort_keys=True, default=str))


def format_duration(seconds: float) -> str:
    """'2 h 05 min', '12 min 03 s' or '4.2 s'."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def stage_line(main, args, what: str):
    """With --pipeline-stage K/N: one line `== stage K/N <script>: <what>` on stdout."""
    if getattr(args, "pipeline_stage", None):
        script = os.path.basename(getattr(sys.modules.get(main.__module__), "__file__", None) or main.__module__)
        print(f"== stage {args.pipeline_stage} {script}: {what}", flush=True)


def run_script(main, parse_args, argv=None) -> int:
    """Run a stage script: UserError -> one line on stderr and exit 2; Ctrl-C -> exit 130; a stage that --once
    finds finished -> one line on stdout and exit 0. With --pipeline-stage, a line at the start and one with the
    elapsed time at the end."""
    args = parse_args(argv)
    start = time.time()
    stage_line(main, args, "started")
    try:
        main(args)
    except NothingToDo as done:
        print(done, flush=True)
        stage_line(main, args, f"skipped ({format_duration(time.time() - start)})")
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last saved checkpoint is intact; continue with --resume", file=sys.stderr)
        return 130
    stage_line(main, args, f"done in {format_duration(time.time() - start)}")
    return 0
