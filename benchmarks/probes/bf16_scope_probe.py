"""Probe: where bf16 autocast may go in the teacher's loop, and why a run-wide context diverges.

Runs the project's own teacher step (`utils.gan.steps.NonPrivateStep`, default widths and weight average) on the public
10k split for --steps steps from the same seed, once per scope:
  fp32                  no autocast (the reference);
  forward               the project's bf16: one autocast context per forward pass (`utils.run.precision`);
  step                  one autocast context around each whole step: forwards, losses, backward, both optimiser steps
                        and the weight average (the context exits, and its cast cache empties, once per step);
  run                   one autocast context around the whole run, as when a script's main is wrapped in one;
  run-no-cache          the same with `cache_enabled=False`: autocast casts every weight afresh on every use.
Every --log-every steps it records the losses, the mean |logit| of D on a fixed real batch and on fixed fakes,
the pixel std across fixed-noise samples (0: every input draws the same image) and the share of pixels at -1.
Prints a table per scope and writes JSON and one sample grid per scope to --results-dir.

  OMP_NUM_THREADS=1 python benchmarks/probes/bf16_scope_probe.py --steps 1500
"""
import contextlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from models import Discriminator, Generator  # noqa: E402
from utils.data.datasets import EpochBatches, load_split  # noqa: E402
from utils.evaluation.plots import save_samples  # noqa: E402
from utils.gan.recipe import TEACHER_EMA_DECAY, Recipe, RecipeConfig  # noqa: E402
from utils.gan.steps import NonPrivateStep, fixed_inputs, generate  # noqa: E402
from utils.run.cli import make_parser, positive_int, progress_bar, run_script, set_seed  # noqa: E402
from utils.run.files import write_json  # noqa: E402
from utils.run.precision import FP32, Precision  # noqa: E402

SCOPES = ("fp32", "forward", "step", "run", "run-no-cache")


def parse_args(argv=None):
    parser = make_parser(__doc__, "python benchmarks/probes/bf16_scope_probe.py --steps 1500 --scopes run forward")
    parser.add_argument("--steps", type=positive_int, default=1500)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--log-every", type=positive_int, default=100)
    parser.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results", "bf16-scope"))
    return parser.parse_args(argv)


def build_step(scope: str, split, args) -> NonPrivateStep:
    set_seed(args.seed)
    G, D = Generator(), Discriminator()
    optimizers = {"g": torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999)),
                  "d": torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))}
    recipe = Recipe(RecipeConfig(ema_decay=TEACHER_EMA_DECAY), G, args.seed)
    precision = Precision("bf16", channels_last=True) if scope == "forward" else FP32
    return NonPrivateStep(G, D, optimizers, EpochBatches(split, args.batch_size, args.seed), 1000, {}, args.seed,
                          "cpu", recipe, precision)


@torch.no_grad()
def health(step: NonPrivateStep, real, real_labels, z, labels) -> dict:
    """D's mean |logit| on fixed real images and fixed fakes (float32, no autocast); the fakes' diversity."""
    G, D = step.generator, step.discriminator
    fakes = generate(G, z, labels)
    return {"real_abs_logit": D(real, real_labels).abs().mean().item(),
            "fake_abs_logit": D(fakes, labels).abs().mean().item(),
            "sample_std": fakes.std(dim=0).mean().item(), "share_at_minus_one": (fakes <= -0.999).float().mean().item()}


def train(scope: str, split, args) -> dict:
    step = build_step(scope, split, args)
    real, real_labels = split.batch(torch.arange(256))
    z, labels = fixed_inputs(step.generator, per_class=10)
    run_context = torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=scope != "run-no-cache") \
        if scope.startswith("run") else contextlib.nullcontext()
    records, start = [], time.time()
    with run_context:
        for number, batch in enumerate(progress_bar(step.batches(0, args.steps), total=args.steps,
                                                    desc=scope), start=1):
            step_context = torch.autocast("cpu", dtype=torch.bfloat16) if scope == "step" else contextlib.nullcontext()
            with step_context:
                losses = step.optimize_parameters(batch, number)
            if number % args.log_every == 0 or number == args.steps:
                with torch.autocast("cpu", enabled=False):
                    records.append({"step": number, **losses, **health(step, real, real_labels, z, labels)})
    with torch.autocast("cpu", enabled=False):
        save_samples(generate(step.sampling_generator(), z, labels), os.path.join(args.results_dir,
                                                                                  f"samples-{scope}.png"), nrow=10)
    return {"records": records, "seconds": time.time() - start}


def print_table(scope: str, result: dict):
    print(f"\n{scope} ({result['seconds'] / 60:.1f} min)")
    print("  step  d_loss  g_loss  |D(real)|  |D(fake)|  sample std  share at -1")
    for r in result["records"]:
        print(f"{r['step']:6d} {r['d_loss']:7.4f} {r['g_loss']:7.4f} {r['real_abs_logit']:10.3f} "
              f"{r['fake_abs_logit']:10.3f} {r['sample_std']:11.4f} {r['share_at_minus_one']:11.3f}")


def main(args):
    os.makedirs(args.results_dir, exist_ok=True)
    split = load_split("fashion-mnist", "public", args.data_root)
    results = {"settings": {**vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__}}
    for scope in args.scopes:
        results[scope] = train(scope, split, args)
        print_table(scope, results[scope])
        write_json(os.path.join(args.results_dir, "bf16-scope.json"), results)
    return results


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
