"""Benchmark: the time of one training step of `train_teacher.py` with 1 and with N processes (torchrun, gloo on
the CPU or nccl on GPUs), at the same global batch.

Each configuration is a real run of the stage script (a fresh `--out` under a temporary directory, `--max-steps`
steps, a metrics record every `--log-every` steps); the step time is read from rank 0's `metrics.jsonl` between
the first record and the last, so process start-up, data loading and the figures at the end are not counted.
Prints a table and writes JSON to benchmarks/results/.
"""
import os
import platform
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from utils.run.checkpoint import read_metrics  # noqa: E402
from utils.run.cli import make_parser, positive_int, run_script  # noqa: E402
from utils.run.files import write_json  # noqa: E402


def parse_args(argv=None):
    parser = make_parser(__doc__, "python benchmarks/bench_scale_out.py --nproc 1 2 --max-steps 60\n"
                                  "  python benchmarks/bench_scale_out.py --device cuda --nproc 1 2 4 8")
    parser.add_argument("--nproc", type=positive_int, nargs="+", default=[1, 2], help="process counts to time")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    parser.add_argument("--threads", type=positive_int, default=1, help="OMP_NUM_THREADS of every process")
    parser.add_argument("--max-steps", type=positive_int, default=60)
    parser.add_argument("--log-every", type=positive_int, default=10)
    parser.add_argument("--dp", action="store_true", help="time the DP teacher (--dp --split private)")
    parser.add_argument("--stage-args", default="--batch-size 64",
                        help="further train_teacher.py flags, one string (the global batch is --batch-size)")
    return parser.parse_args(argv)


def command(args, nproc: int, out: str) -> list:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    stage = ["train_teacher.py", "--out", out, "--device", args.device, "--max-steps", str(args.max_steps),
             "--log-every", str(args.log_every), "--checkpoint-every", str(10 * args.max_steps),
             *args.stage_args.split()]
    return launcher + stage + (["--dp", "--split", "private"] if args.dp else [])


def time_per_step(args, nproc: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(command(args, nproc, out), cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        records = [r for r in read_metrics(os.path.join(out, "teacher", "latest")) if "time" in r and r.get("step")]
    first, last = records[0], records[-1]
    return (last["time"] - first["time"]) / (last["step"] - first["step"])


def main(args):
    results = {n: time_per_step(args, n) for n in args.nproc}
    print(f"| processes | s/step | speed-up |  ({'DP ' if args.dp else ''}teacher, {args.stage_args}, "
          f"{args.threads} thread(s) per process, {args.device})")
    print("|---|---|---|")
    for n, seconds in results.items():
        print(f"| {n} | {seconds:.3f} | {results[args.nproc[0]] / seconds:.2f}x |")
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    write_json(os.path.join(ROOT, "benchmarks", "results", "scale_out.json"),
               {"args": vars(args), "seconds_per_step": results, "machine": platform.platform(),
                "cpus": os.cpu_count()})
    return results


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
