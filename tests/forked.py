"""Processes forked from one fresh server process that has imported the stage scripts once (multiprocessing's
forkserver): a stage run to be killed, or torchrun's launcher, without the interpreter start of a subprocess
(torch, torchvision, onnx, scipy and matplotlib again: about 5 s each at 1 thread). A plain fork of pytest is unsafe
once autograd's threads run; the server has only imported modules. Every test that forks uses this one server
(`PRELOAD` is read when the first of them starts it), test_distributed.py's 2-process launch included.

A forked stage runs as its script's __main__ does (`run_script(main, parse_args, argv)`), at 1 thread like the
subprocesses it replaces (they had OMP_NUM_THREADS=1), from the repository root, its output in a log file.
"""
import importlib
import multiprocessing
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOAD = ["torch", "torch._dynamo", "opacus", "models", "utils.run.distributed", "utils.gan.steps",
           "torch.distributed.run", "train_teacher", "create_dataset", "train_student", "compress_student",
           "fine_tune", "evaluate"]


def use_the_shared_server():
    """Name the modules the forkserver imports when it starts (no effect once it runs: it is started once)."""
    multiprocessing.set_forkserver_preload(PRELOAD)


def _as_forked_stage(log_path: str):
    """This forked process: output to `log_path`, 1 thread, the repository root as working directory."""
    import torch
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    os.chdir(ROOT)


def _run_stages(commands: list, log_path: str):
    """Each (script module, argv) in turn as `python <script>.py argv` would run it, stopping at the first that
    fails, as make does."""
    from utils.run.cli import run_script
    _as_forked_stage(log_path)
    for module_name, argv in commands:
        module = importlib.import_module(module_name)
        code = run_script(module.main, module.parse_args, argv)
        if code:
            sys.exit(code)


def _torchrun(argv: list, log_path: str):
    """`python -m torch.distributed.run argv`: the launcher here, its workers real interpreters it starts."""
    from torch.distributed.run import main
    _as_forked_stage(log_path)
    main(argv)


class Forked:
    """A forked process: `pid`, `poll()` (its exit code, None while it runs), `wait(timeout)`, `output()`."""

    def __init__(self, target, args: tuple, log_path: str):
        use_the_shared_server()
        self.log_path = log_path
        open(log_path, "a").close()
        self.process = multiprocessing.get_context("forkserver").Process(target=target, args=(*args, log_path))
        self.process.start()
        self.pid = self.process.pid

    def poll(self):
        return self.process.exitcode

    def wait(self, timeout: float):
        """The exit code; a process still running after `timeout` seconds is killed and reported as hanging."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise AssertionError(f"still running after {timeout} s (hanging?):\n{self.output()}")
        return self.process.exitcode

    def output(self) -> str:
        with open(self.log_path) as handle:
            return handle.read()


def run_stages(commands: list, log_path: str) -> Forked:
    """Start the stage commands [(script module name, argv), ...] in a forked process."""
    return Forked(_run_stages, (commands,), log_path)


def torchrun(argv: list, log_path: str) -> Forked:
    """Start torchrun's launcher with `argv` in a forked process."""
    return Forked(_torchrun, (argv,), log_path)
