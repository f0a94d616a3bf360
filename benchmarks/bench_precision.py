"""Benchmark: what bf16 autocast and channels-last buy on this machine, for the three kinds of non-private work.

Times, in one process and interleaved (every variant once per round, so a change in the machine's load hits all of
them alike), the project's own steps on synthetic inputs (the cost does not depend on the pixels):
  teacher step     `utils.gan.steps.NonPrivateStep.optimize_parameters`: one D and one G update of the default teacher
                   (G 256/128/64, D 64/128 for 28 px) at --batch-size, with the default weight average;
  student step     `utils.compression.slimming.slimming_step` of an 8-bit student of the teacher's widths (D step,
                   distillation + GAN step, proximal step) at --batch-size;
  classifier epoch one epoch of the downstream protocol's classifier (`utils.evaluation.metrics.protocol_accuracy`,
                   MnistCNN, batch 64) on --classifier-samples images, with its hold-out scoring.
in fp32, fp32 + channels-last, bf16 and bf16 + channels-last (`utils.run.precision`), and prints each one's median and
its ratio to fp32. Writes benchmarks/results/precision-<time>.{json,md}. bf16 variants run only where the hardware
supports bf16 natively (`utils.run.precision.bf16_support`); elsewhere the script says so and times fp32 alone.

  OMP_NUM_THREADS=2 python benchmarks/bench_precision.py --threads 2
"""
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import statistics  # noqa: E402

import torch  # noqa: E402

from models import Discriminator, Generator  # noqa: E402
from utils.compression.slimming import gamma_parameters, other_parameters, slimming_step  # noqa: E402
from utils.evaluation.metrics import PROTOCOL, protocol_accuracy, protocol_variant  # noqa: E402
from utils.gan.recipe import TEACHER_EMA_DECAY, Recipe, RecipeConfig  # noqa: E402
from utils.gan.steps import NonPrivateStep  # noqa: E402
from utils.run.cli import make_parser, nonnegative_int, positive_int, run_script, set_seed, set_threads  # noqa: E402
from utils.run.files import write_json, write_text  # noqa: E402
from utils.run.precision import Precision, bf16_support  # noqa: E402

WORKS = ("teacher step", "student step", "classifier epoch")


def parse_args(argv=None):
    parser = make_parser(__doc__, "python benchmarks/bench_precision.py --rounds 5 --classifier-samples 6000")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="teacher and student batch")
    parser.add_argument("--rounds", type=positive_int, default=7, help="timed rounds (medians); one warm-up round")
    parser.add_argument("--classifier-samples", type=positive_int, default=PROTOCOL.num_samples - PROTOCOL.holdout,
                        help="training images of the classifier epoch (the published protocol's: 55,000)")
    parser.add_argument("--threads", type=nonnegative_int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    return parser.parse_args(argv)


def variants() -> dict:
    """The precisions to time: fp32 with and without channels-last, and bf16 likewise where it is native."""
    chosen = {"fp32": Precision("fp32"), "fp32 + channels-last": Precision("fp32", channels_last=True)}
    if bf16_support(torch.device("cpu"))[0]:
        chosen.update({"bf16": Precision("bf16"), "bf16 + channels-last": Precision("bf16", channels_last=True)})
    return chosen


def teacher_step(precision: Precision, batch: int):
    """One call: a NonPrivateStep update of the default teacher in `precision`, on a random batch."""
    set_seed(0)
    G, D = Generator(), Discriminator()
    optimizers = {"g": torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999)),
                  "d": torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))}
    recipe = Recipe(RecipeConfig(ema_decay=TEACHER_EMA_DECAY), G, 0)
    step = NonPrivateStep(G, D, optimizers, [None], 1, {}, 0, "cpu", recipe, precision)
    batch_data = (torch.rand(batch, 1, 28, 28) * 2 - 1, torch.arange(batch) % 10)
    return lambda: step.optimize_parameters(batch_data, 1)


def student_step(precision: Precision, batch: int):
    """One call: a slimming step of an 8-bit student of the teacher's widths in `precision`."""
    set_seed(0)
    G, D = Generator(bits=8), Discriminator()
    precision.prepare(G, D)
    optimizers = {"g": torch.optim.Adam(other_parameters(G), 2e-4, betas=(0.5, 0.999)),
                  "gamma": torch.optim.SGD(gamma_parameters(G), 0.1, momentum=0.5),
                  "d": torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))}
    z, labels = G.sample_inputs(batch, generator=torch.Generator().manual_seed(0))
    data = (z, labels, torch.rand(batch, 1, 28, 28) * 2 - 1)
    return lambda: slimming_step(G, D, optimizers, data, 20.0, 0.01, precision=precision)


def classifier_epoch(precision: Precision, samples: int):
    """One call: one epoch of the protocol's classifier on `samples` random images (+ its hold-out scoring)."""
    holdout = max(1, samples // 11)
    images = torch.rand(samples + holdout, 1, 28, 28) * 2 - 1
    labels = torch.arange(samples + holdout) % 10
    test = (images[:1000], labels[:1000])
    protocol = protocol_variant(PROTOCOL, samples + holdout, 1)
    return lambda: protocol_accuracy(images, labels, *test, protocol, precision=precision, desc="classifier")


def time_rounds(calls: dict, rounds: int) -> dict:
    """Median seconds of each call over `rounds` interleaved rounds, after one warm-up round."""
    times = {name: [] for name in calls}
    for round_number in range(rounds + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_number:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(args) -> dict:
    chosen = variants()
    builders = {"teacher step": lambda p: teacher_step(p, args.batch_size),
                "student step": lambda p: student_step(p, args.batch_size),
                "classifier epoch": lambda p: classifier_epoch(p, args.classifier_samples)}
    result = {}
    for work in WORKS:
        rounds = args.rounds if work != "classifier epoch" else max(1, args.rounds // 3)
        seconds = time_rounds({name: builders[work](precision) for name, precision in chosen.items()}, rounds)
        result[work] = {name: {"ms": 1000 * value, "speedup": seconds["fp32"] / value}
                        for name, value in seconds.items()}
        print(f"{work}: " + ", ".join(f"{name} {1000 * value:.1f} ms" for name, value in seconds.items()),
              flush=True)
    return result


def markdown(result: dict, settings: dict) -> str:
    names = list(next(iter(result.values())))
    lines = [f"# bf16 and channels-last ({settings['when']})", "",
             f"`{settings['command']}`: {settings['threads']} thread(s), torch {settings['torch']}, "
             f"{settings['cpu']}; bf16 native: {settings['bf16']}. Median of interleaved rounds; ratio = fp32 time / "
             f"this time (above 1: faster).", "",
             "| work | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for work, row in result.items():
        lines.append(f"| {work} | " + " | ".join(f"{row[n]['ms']:.1f} ms ({row[n]['speedup']:.2f}x)" for n in names)
                     + " |")
    return "\n".join(lines) + "\n"


def main(args):
    set_threads(args.threads)
    supported, why = bf16_support(torch.device("cpu"))
    settings = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "cpu": f"{platform.machine()}, {os.cpu_count()} CPUs", "bf16": why,
                "batch_size": args.batch_size, "rounds": args.rounds, "classifier_samples": args.classifier_samples,
                "command": "python " + " ".join(sys.argv)}
    if not supported:
        print(f"bf16 not timed: {why}")
    result = measure(args)
    table = markdown(result, settings)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.results_dir, exist_ok=True)
    write_json(os.path.join(args.results_dir, f"precision-{stamp}.json"), {"settings": settings, "result": result})
    write_text(os.path.join(args.results_dir, f"precision-{stamp}.md"), table)
    print(table)
    return result


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
