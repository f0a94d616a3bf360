"""Benchmark: one DP discriminator step (the fine-tuning step) against the same step without DP, in one run.

Same models (the compact generator, widths 96 48 24 at 8 bits by default, and the default Discriminator), the same
batch of 128 real images (synthetic pixels: the cost does not depend on them) and as many fakes: utils/privacy/dp.py's
step for each Opacus grad_sample_mode (hooks, functorch, ew, ghost) against utils/gan/steps.py's non-private step. A
mode that fails is reported, not fatal.

Each mode is also checked for exact clipping on a tiny batch with noise 0: its clipped, summed gradient must
equal one computed by hand per sample (each (real i, fake i) pair's gradient clipped to C, summed, divided by the
expected batch size), and its per-sample norms must match the hand-computed ones (so the clipped norms are <= C).
C is the median per-sample norm, so half of the samples are clipped. The fastest exact mode is reported; it is
the default --grad-sample-mode of fine_tune.py and train_teacher.py --dp (utils.privacy.dp.DEFAULT_GRAD_SAMPLE_MODE).

The --reuse-fakes variant (rows "<mode>+reuse/<d>", one per mode and per --reuse-fakes-d-steps d): one pool of
fakes (utils.privacy.dp.FakePool, B plus 6 standard deviations of the batch size) drawn per d D steps, as a run
with d D steps per G step draws it; its time is that of d D steps, the pool's draw included, over d, against d
non-DP steps over d (the generator step itself is timed in no row). Its exactness check clips each (real i, pool
fake i) pair by hand. Every row reports DP samples per second: the batch over the DP step's time.

Goal: the DP step takes at most 2x the non-DP step. Prints a table and writes JSON to benchmarks/results/.
"""
import copy
import os
import platform
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import QUANT_BITS, Discriminator, Generator  # noqa: E402
from utils.data.datasets import ImageSplit  # noqa: E402
from utils.gan import steps  # noqa: E402
from utils.privacy import dp  # noqa: E402
from utils.run.cli import (add_common_args, make_parser, nonnegative_int, positive_int, quant_bits,  # noqa: E402
                           run_script, set_seed, set_threads)
from utils.run.files import write_json  # noqa: E402
from utils.run.lifecycle import maybe_dry_run  # noqa: E402

RATIO_GOAL = 2.0  # DP step time / non-DP step time
EXACT_RTOL = 1e-4  # relative error of the clipped summed gradient against the hand-computed one


def parse_args(argv=None):
    parser = make_parser(__doc__, "python benchmarks/bench_dp_step.py --threads 1\n"
                                  "  python benchmarks/bench_dp_step.py --modes hooks ghost --repeats 50")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--modes", nargs="+", choices=dp.GRAD_SAMPLE_MODES, default=list(dp.GRAD_SAMPLE_MODES))
    group.add_argument("--reuse-fakes-d-steps", type=positive_int, nargs="*", default=[dp.DEFAULT_D_STEPS_PER_G_STEP],
                       metavar="D", help="rows of the --reuse-fakes variant of every mode, one pool of fakes per D "
                                         "D steps (none: no such rows)")
    group.add_argument("--batch-size", type=positive_int, default=128)
    group.add_argument("--g-channels", type=positive_int, nargs=3, default=[96, 48, 24])
    group.add_argument("--bits", type=quant_bits, default=QUANT_BITS)
    group.add_argument("--private-size", type=positive_int, default=50000, help="N of the sample rate q = B/N")
    group.add_argument("--repeats", type=positive_int, default=30)
    group.add_argument("--warmup", type=positive_int, default=5)
    group.add_argument("--check-batch", type=positive_int, default=6, help="batch of the exact-clipping check")
    group.add_argument("--threads", type=nonnegative_int, default=0, help="CPU threads (0: torch's default)")
    group.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    add_common_args(parser)
    return parser.parse_args(argv)


# ---------------------------------------------------------------- set-up

def synthetic_split(n: int, seed: int) -> ImageSplit:
    rng = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=rng)
    labels = torch.randint(0, 10, (n,), generator=rng)
    return ImageSplit(images, labels, "synthetic", "private", torch.arange(n), "random", {})


def models(args, device):
    torch.manual_seed(args.seed)
    G = Generator(channels=args.g_channels, bits=args.bits).to(device).train()
    D = Discriminator().to(device)
    return G, D


def private(D, split, batch_size, noise, clip, mode, device):
    optimizer = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    config = dp.DPConfig(max_grad_norm=clip, accountant="rdp", grad_sample_mode=mode)
    return dp.PrivateDiscriminator(D, optimizer, split, batch_size, noise, config, seed=0, device=device)


def _seconds(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_medians(fns: dict, repeats: int, warmup: int, device) -> dict:
    """Median seconds of each function, the calls interleaved so that a busy machine slows all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_seconds(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


# ---------------------------------------------------------------- timing

def time_mode(args, mode, split, real, labels, device, reuse_d_steps: int = None) -> dict:
    """Median seconds of the DP step in `mode` and of the non-DP step on the same models and batch. With
    `reuse_d_steps` (--reuse-fakes): the time of that many DP steps sharing one pool of fakes, the pool's draw
    included, against as many non-DP steps, each over the number of steps."""
    G, D = models(args, device)
    G_plain, D_plain = copy.deepcopy(G), copy.deepcopy(D)
    pd = private(D, split, args.batch_size, 1.0, 1.0, mode, device)
    plain_opt = torch.optim.Adam(D_plain.parameters(), 2e-4, betas=(0.5, 0.999))
    rng, plain_rng = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    cycle = reuse_d_steps or 1
    pool = dp.FakePool(dp.fake_pool_size(args.batch_size, args.batch_size / args.private_size)) \
        if reuse_d_steps else None

    def dp_step():  # with a pool: a generator step has just replaced the fakes, the first D step draws the pool
        if pool is not None:
            pool.refresh()
        for _ in range(cycle):
            dp.dp_discriminator_step(pd, G, real, labels, rng, pool=pool)

    def plain_step():
        for _ in range(cycle):
            steps.nonprivate_discriminator_step(G_plain, D_plain, plain_opt, real, labels, plain_rng)
    medians = interleaved_medians({"dp": dp_step, "non_dp": plain_step}, args.repeats, args.warmup, device)
    dp_s, non_dp_s = medians["dp"] / cycle, medians["non_dp"] / cycle
    return {"dp_ms": dp_s * 1e3, "non_dp_ms": non_dp_s * 1e3, "ratio": dp_s / non_dp_s,
            "dp_samples_per_s": len(real) / dp_s}


# ---------------------------------------------------------------- exact clipping

def reference_grads(D, real, labels, fake, fake_labels):
    """Per-sample gradients of each (real i, fake i) pair's loss, computed one sample at a time."""
    params = [p for p in D.parameters() if p.requires_grad]
    grads = []
    for i in range(len(real)):
        loss = (F.softplus(-D(real[i:i + 1], labels[i:i + 1])).sum()
                + F.softplus(D(fake[i:i + 1], fake_labels[i:i + 1])).sum())
        grads.append([g.detach() for g in torch.autograd.grad(loss, params)])
    return grads


def dp_per_sample_norms(pd) -> torch.Tensor:
    if pd.grad_sample_mode == "ghost":
        return pd.module.get_norm_sample().detach()
    samples = [g.reshape(len(g), -1) for g in pd.optimizer.grad_samples]
    return torch.stack([s.norm(2, dim=1) for s in samples], dim=1).norm(2, dim=1).detach()


def check_exact(args, mode, device, reuse: bool = False) -> dict:
    """Noise 0, C = median norm: the DP gradient against the hand-clipped per-sample sum (with `reuse`, of each
    real example and its fake of a --reuse-fakes pool)."""
    G, D = models(args, device)
    n = args.check_batch
    split = synthetic_split(10 * n, args.seed + 1)
    real, labels = split.batch(torch.arange(n))
    real, labels = real.to(device), labels.to(device)
    if reuse:
        pool = dp.FakePool(dp.fake_pool_size(n, n / len(split)))
        fake, fake_labels = pool.take(G, n, torch.Generator().manual_seed(2), device)
    else:
        z, fake_labels = steps.random_inputs(G, n, torch.Generator().manual_seed(2), device)
        with torch.no_grad():
            fake = G(z, fake_labels)
    grads = reference_grads(copy.deepcopy(D), real, labels, fake, fake_labels)
    norms = torch.stack([torch.cat([g.flatten() for g in gs]).norm() for gs in grads])
    clip = norms.median().item()
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(f * gs[k] for f, gs in zip(factors, grads)) / n for k in range(len(grads[0]))]

    pd = private(D, split, n, 0.0, clip, mode, device)
    dp.discriminator_backward(pd, real, labels, fake, fake_labels)
    dp_norms = dp_per_sample_norms(pd)
    pd.optimizer.pre_step()  # clip, add (zero) noise, scale: p.grad is what the optimizer would apply
    got = [p.grad.detach() for p in pd.optimizer.params]
    grad_err = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(got, expected))
    norm_err = ((dp_norms.flatten() - norms).abs().max() / norms.max()).item()
    clipped = (dp_norms.flatten() * (clip / (dp_norms.flatten() + 1e-6)).clamp(max=1.0)).max().item()
    exact = grad_err < EXACT_RTOL and norm_err < EXACT_RTOL and clipped <= clip * (1 + 1e-6)
    return {"exact": bool(exact), "grad_rel_err": grad_err, "norm_rel_err": norm_err, "max_clipped_norm": clipped,
            "clip": clip, "clipped_samples": int((norms > clip).sum())}


def run_mode(args, mode, split, real, labels, device, reuse_d_steps: int = None) -> dict:
    row = {"mode": mode if reuse_d_steps is None else f"{mode}+reuse/{reuse_d_steps}", "grad_sample_mode": mode,
           "reuse_fakes_d_steps": reuse_d_steps}
    for name, fn in (("check", lambda: check_exact(args, mode, device, reuse=reuse_d_steps is not None)),
                     ("timing", lambda: time_mode(args, mode, split, real, labels, device, reuse_d_steps))):
        try:
            row.update(fn())
        except Exception as exc:  # a mode that does not work here is a result, not a crash
            row.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            traceback.print_exc(file=sys.stderr)
    row["ok"] = "errors" not in row
    return row


def fastest_exact(rows) -> str:
    """The fastest exact grad-sample mode with fresh fakes (the default --grad-sample-mode's candidates)."""
    candidates = [r for r in rows if r["ok"] and r.get("exact") and r.get("reuse_fakes_d_steps") is None]
    return min(candidates, key=lambda r: r["dp_ms"])["mode"] if candidates else None


def format_table(rows) -> str:
    lines = [f"{'mode':<18} {'DP ms':>9} {'non-DP ms':>10} {'ratio':>7} {'DP samples/s':>13} {'exact':>6} "
             f"{'grad err':>9}  note"]
    for r in rows:
        if "dp_ms" in r:
            timing = f"{r['dp_ms']:>9.2f} {r['non_dp_ms']:>10.2f} {r['ratio']:>7.2f} {r['dp_samples_per_s']:>13.0f}"
        else:
            timing = f"{'-':>9} {'-':>10} {'-':>7} {'-':>13}"
        exact = str(r.get("exact", "-"))
        err = f"{r['grad_rel_err']:.1e}" if "grad_rel_err" in r else "-"
        note = "; ".join(f"{k} failed: {v}" for k, v in r.get("errors", {}).items())
        lines.append(f"{r['mode']:<18} {timing} {exact:>6} {err:>9}  {note}")
    return "\n".join(lines)


def main(args):
    if maybe_dry_run(args):
        return None
    set_seed(args.seed)
    set_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    split = synthetic_split(args.private_size, args.seed)
    real, labels = split.batch(torch.arange(args.batch_size))
    real, labels = real.to(device), labels.to(device)
    rows = [run_mode(args, mode, split, real, labels, device) for mode in args.modes]
    rows += [run_mode(args, mode, split, real, labels, device, d) for d in args.reuse_fakes_d_steps
             for mode in args.modes]
    best = fastest_exact(rows)
    print(format_table(rows))
    best_row = next((r for r in rows if r["mode"] == best), None)
    if best_row:
        verdict = "meets" if best_row["ratio"] <= RATIO_GOAL else "MISSES"
        print(f"fastest exact mode: {best} (DP/non-DP = {best_row['ratio']:.2f}x, {verdict} the {RATIO_GOAL:g}x goal);"
              f" default in utils/privacy/dp.py: {dp.DEFAULT_GRAD_SAMPLE_MODE}")
    else:
        print("no mode clipped exactly")
    result = {"rows": rows, "fastest_exact": best, "ratio_goal": RATIO_GOAL, "default": dp.DEFAULT_GRAD_SAMPLE_MODE,
              "batch_size": args.batch_size, "g_channels": args.g_channels, "bits": args.bits,
              "discriminator": Discriminator().model_args(), "device": str(device),
              "threads": torch.get_num_threads(), "repeats": args.repeats,
              "reuse_fakes_d_steps": args.reuse_fakes_d_steps, "torch": torch.__version__,
              "platform": platform.platform(), "processor": platform.processor()}
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, f"dp-step-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json(path, result)
    print(f"results: {path}")
    return path


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
