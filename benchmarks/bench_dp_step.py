"""Benchmark: one DP discriminator step against the same step without DP, for every variant, in one process.

Models: the compact generator (widths 96 48 24 at 8 bits by default; it only makes the fakes, in both steps alike)
and the routes' discriminator (models.Discriminator's default widths, `--d-channels`); batches of real images
(synthetic pixels: the cost does not depend on them) of every `--batch-sizes` (the expected batch B; every row
takes exactly B pairs) and as many fakes. The DP step is utils/privacy/dp.py's, the plain one utils/gan/steps.py's
non-private step of the same discriminator, batch and memory layout, the calls interleaved.

A variant (`--variants`, one table row per batch size) is a `--grad-sample-mode` with options joined by "+":

- `reuse/D`: --reuse-fakes, one pool of fakes (utils.privacy.dp.FakePool) per D D steps, as a run with D D steps
  per G step draws it; the time of D DP steps, the pool's draw included, over D, against D plain steps over D.
- `channels-last`: the discriminator (both steps') in channels-last memory format.
- `physical/M`: Opacus's batch memory manager done by hand: the Poisson batch in physical chunks of at most M
  pairs, each clipped and accumulated, the noise and the optimizer step once at the last (DPOptimizer's
  `signal_skip_step`, as `opacus.utils.batch_memory_manager` does). A row whose batch is not above M is skipped.
- `d=W1/W2`: a discriminator of these widths (fewer parameters: less total noise, sigma*C/B per parameter).

Every variant is checked for exact clipping on a tiny batch with noise 0: its clipped, summed gradient must equal
one computed by hand per pair (each (real i, fake i) pair's gradient clipped to C, summed, divided by the batch),
its per-pair norms the hand-computed ones; C is the median norm, so half of the pairs are clipped. A variant that
fails is a row with its error, not a crash. Every row reports DP samples per second (the batch over the DP step's
time) and the discriminator's parameter count. The fastest exact plain mode (no option) is reported; the default
--grad-sample-mode of fine_tune.py and train_teacher.py --dp is chosen from it (utils.privacy.dp).

Goal (issue 25): the DP step takes at most 1.5x the plain step. Writes benchmarks/results/dp_step-<time>.{json,md}.
"""
import copy
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import QUANT_BITS, Discriminator, Generator  # noqa: E402
from utils.data.datasets import ImageSplit  # noqa: E402
from utils.gan import steps  # noqa: E402
from utils.privacy import dp  # noqa: E402
from utils.run.cli import (add_common_args, make_parser, nonnegative_int, positive_int, progress_bar,  # noqa: E402
                           quant_bits, run_script, set_seed, set_threads)
from utils.run.files import write_json, write_text  # noqa: E402
from utils.run.lifecycle import maybe_dry_run  # noqa: E402

RATIO_GOAL = 1.5  # DP step time / plain step time (issue 25)
EXACT_RTOL = 1e-4  # relative error of the clipped summed gradient against the hand-computed one
DEFAULT_VARIANTS = (*dp.GRAD_SAMPLE_MODES, "hooks+reuse/5", "fused+reuse/5", "hooks+channels-last",
                    "fused+channels-last", "hooks+physical/128", "fused+physical/128", "fused+d=32/64",
                    "fused+d=16/32", "fused+d=32/64+reuse/5")


def parse_args(argv=None):
    parser = make_parser(__doc__, "python benchmarks/bench_dp_step.py --threads 1\n"
                                  "  python benchmarks/bench_dp_step.py --batch-sizes 128 --variants hooks fused "
                                  "fused+reuse/5 fused+d=32/64")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="MODE[+OPTION...]",
                       help=f"modes {', '.join(dp.GRAD_SAMPLE_MODES)}; options reuse/D, channels-last, physical/M, "
                            f"d=W1/W2 (see above)")
    group.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[128, 512])
    group.add_argument("--g-channels", type=positive_int, nargs=3, default=[96, 48, 24])
    group.add_argument("--d-channels", type=positive_int, nargs="+", default=None,
                       help="the discriminator's widths (default: models.Discriminator's, the routes')")
    group.add_argument("--bits", type=quant_bits, default=QUANT_BITS)
    group.add_argument("--private-size", type=positive_int, default=50000, help="N of the sample rate q = B/N")
    group.add_argument("--repeats", type=positive_int, default=20)
    group.add_argument("--warmup", type=nonnegative_int, default=3)
    group.add_argument("--check-batch", type=positive_int, default=6, help="batch of the exact-clipping check")
    group.add_argument("--threads", type=nonnegative_int, default=0, help="CPU threads (0: torch's default)")
    group.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    add_common_args(parser)
    args = parser.parse_args(argv)
    try:
        args.parsed_variants = [Variant.parse(text, args.d_channels) for text in args.variants]
    except ValueError as exc:
        parser.error(str(exc))
    return args


@dataclass(frozen=True)
class Variant:
    """One row of the table: a grad-sample mode and its options (module docstring)."""
    name: str
    mode: str
    reuse_d_steps: int = None
    channels_last: bool = False
    physical: int = None
    d_channels: tuple = None  # None: the discriminator's default widths

    @classmethod
    def parse(cls, text: str, d_channels=None) -> "Variant":
        mode, *options = text.split("+")
        if mode not in dp.GRAD_SAMPLE_MODES:
            raise ValueError(f"variant {text!r}: the mode must be one of {', '.join(dp.GRAD_SAMPLE_MODES)}")
        fields = {"d_channels": tuple(d_channels) if d_channels else None}
        for option in options:
            key, _, value = option.partition("/" if not option.startswith("d=") else "=")
            try:
                if key == "reuse" and int(value) > 0:
                    fields["reuse_d_steps"] = int(value)
                elif key == "physical" and int(value) > 0:
                    fields["physical"] = int(value)
                elif key == "d" and value:
                    fields["d_channels"] = tuple(int(w) for w in value.split("/"))
                elif option == "channels-last":
                    fields["channels_last"] = True
                else:
                    raise ValueError
            except ValueError:
                raise ValueError(f"variant {text!r}: unknown option {option!r} (reuse/D, channels-last, physical/M, "
                                 f"d=W1/W2)") from None
        return cls(text, mode, **fields)


# ---------------------------------------------------------------- set-up

def synthetic_split(n: int, seed: int) -> ImageSplit:
    rng = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=rng)
    labels = torch.randint(0, 10, (n,), generator=rng)
    return ImageSplit(images, labels, "synthetic", "private", torch.arange(n), "random", {})


def models(args, variant: Variant, device):
    torch.manual_seed(args.seed)
    G = Generator(channels=args.g_channels, bits=args.bits).to(device).train()
    D = Discriminator(channels=variant.d_channels).to(device)
    if variant.channels_last:
        D = D.to(memory_format=torch.channels_last)
    return G, D


def private(D, split, batch_size, noise, clip, mode, device):
    optimizer = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    config = dp.DPConfig(max_grad_norm=clip, accountant="rdp", grad_sample_mode=mode)
    return dp.PrivateDiscriminator(D, optimizer, split, batch_size, noise, config, seed=0, device=device)


def physical_backward_and_step(pd, real, real_labels, fake, fake_labels, physical: int, last_step=None):
    """The batch memory manager's step: each chunk of at most `physical` pairs clipped and accumulated (the DP
    optimizer skips its step), the noise and the optimizer step once, at the last chunk (`last_step`: what to call
    instead of `pd.optimizer.step` there)."""
    starts = range(0, len(real), physical)
    for start in starts:
        chunk = slice(start, start + physical)
        dp.discriminator_backward(pd, real[chunk], real_labels[chunk], fake[chunk], fake_labels[chunk])
        if start != starts[-1]:
            pd.optimizer.signal_skip_step(do_skip=True)
            pd.optimizer.step()
    return (last_step or pd.optimizer.step)()


def dp_step_of(variant: Variant, pd, G, real, labels, rng, pool):
    """One DP discriminator step of the variant (fresh fakes or the pool's, one or several physical chunks)."""
    if variant.physical is None:
        return dp.dp_discriminator_step(pd, G, real, labels, rng, pool=pool)
    if pool is not None:
        fake, fake_labels = pool.take(G, len(real), rng, real.device)
    else:
        z, fake_labels = steps.random_inputs(G, len(real), rng, real.device)
        with torch.no_grad():
            fake = G(z, fake_labels)
    return physical_backward_and_step(pd, real, labels, fake, fake_labels, variant.physical)


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

def time_variant(args, variant: Variant, split, real, labels, device) -> dict:
    """Median seconds of the variant's DP step and of the plain step on the same models and batch. With reuse/D:
    the time of D DP steps sharing one pool of fakes, the pool's draw included, against D plain steps, each over D."""
    G, D = models(args, variant, device)
    G_plain, D_plain = copy.deepcopy(G), copy.deepcopy(D)
    batch = len(real)
    pd = private(D, split, batch, 1.0, 1.0, variant.mode, device)
    plain_opt = torch.optim.Adam(D_plain.parameters(), 2e-4, betas=(0.5, 0.999))
    rng, plain_rng = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    cycle = variant.reuse_d_steps or 1
    pool = dp.FakePool(dp.fake_pool_size(batch, batch / args.private_size)) if variant.reuse_d_steps else None

    def dp_steps():  # with a pool: a generator step has just replaced the fakes, the first D step draws the pool
        if pool is not None:
            pool.refresh()
        for _ in range(cycle):
            dp_step_of(variant, pd, G, real, labels, rng, pool)

    def plain_steps():
        for _ in range(cycle):
            steps.nonprivate_discriminator_step(G_plain, D_plain, plain_opt, real, labels, plain_rng)
    medians = interleaved_medians({"dp": dp_steps, "plain": plain_steps}, args.repeats, args.warmup, device)
    dp_s, plain_s = medians["dp"] / cycle, medians["plain"] / cycle
    return {"dp_ms": dp_s * 1e3, "non_dp_ms": plain_s * 1e3, "ratio": dp_s / plain_s, "dp_samples_per_s": batch / dp_s}


# ---------------------------------------------------------------- exact clipping

def reference_grads(D, real, labels, fake, fake_labels):
    """Per-pair gradients of each (real i, fake i) pair's loss, computed one pair at a time."""
    params = [p for p in D.parameters() if p.requires_grad]
    grads = []
    for i in range(len(real)):
        loss = (F.softplus(-D(real[i:i + 1], labels[i:i + 1])).sum()
                + F.softplus(D(fake[i:i + 1], fake_labels[i:i + 1])).sum())
        grads.append([g.detach() for g in torch.autograd.grad(loss, params)])
    return grads


def dp_per_sample_norms(pd) -> torch.Tensor:
    """The per-pair norms the DP optimizer clips with (of the last physical chunk)."""
    if pd.grad_sample_mode == "ghost":
        return pd.module.get_norm_sample().detach()
    samples = [g.reshape(len(g), -1) for g in pd.optimizer.grad_samples]
    return torch.stack([s.norm(2, dim=1) for s in samples], dim=1).norm(2, dim=1).detach()


def check_exact(args, variant: Variant, device) -> dict:
    """Noise 0, C = median norm: the DP gradient against the hand-clipped per-pair sum (with reuse, of each real
    example and its fake of a --reuse-fakes pool; with physical/M, in chunks of half the check batch)."""
    G, D = models(args, variant, device)
    n = args.check_batch
    split = synthetic_split(10 * n, args.seed + 1)
    real, labels = split.batch(torch.arange(n))
    real, labels = real.to(device), labels.to(device)
    if variant.reuse_d_steps:
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

    pd = private(D, split, n, 0.0, clip, variant.mode, device)
    physical = max(1, n // 2) if variant.physical else n
    dp_norms = []
    pre_step = pd.optimizer.pre_step  # clip, add (zero) noise, scale: p.grad is what the optimizer would apply
    pd.optimizer.pre_step = lambda: (dp_norms.append(dp_per_sample_norms(pd)), pre_step())[1]
    physical_backward_and_step(pd, real, labels, fake, fake_labels, physical, last_step=pd.optimizer.pre_step)
    dp_norms = torch.cat([norm.flatten() for norm in dp_norms])
    got = [p.grad.detach() for p in pd.optimizer.params]
    grad_err = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(got, expected))
    norm_err = ((dp_norms - norms).abs().max() / norms.max()).item()
    clipped = (dp_norms * (clip / (dp_norms + 1e-6)).clamp(max=1.0)).max().item()
    exact = grad_err < EXACT_RTOL and norm_err < EXACT_RTOL and clipped <= clip * (1 + 1e-6)
    return {"exact": bool(exact), "grad_rel_err": grad_err, "norm_rel_err": norm_err, "max_clipped_norm": clipped,
            "clip": clip, "clipped_samples": int((norms > clip).sum())}


def run_variant(args, variant: Variant, split, batch: int, device) -> dict:
    D = Discriminator(channels=variant.d_channels)
    row = {"variant": variant.name, "batch_size": batch, "grad_sample_mode": variant.mode,
           "reuse_fakes_d_steps": variant.reuse_d_steps, "channels_last": variant.channels_last,
           "physical": variant.physical, "d_channels": list(D.channels),
           "d_params": sum(p.numel() for p in D.parameters())}
    if variant.physical is not None and batch <= variant.physical:
        return {**row, "ok": True, "skipped": f"batch {batch} is not above the physical batch {variant.physical}"}
    real, labels = split.batch(torch.arange(batch))
    real, labels = real.to(device), labels.to(device)
    for name, fn in (("check", lambda: check_exact(args, variant, device)),
                     ("timing", lambda: time_variant(args, variant, split, real, labels, device))):
        try:
            row.update(fn())
        except Exception as exc:  # a variant that does not work here is a result, not a crash
            row.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            traceback.print_exc(file=sys.stderr)
    row["ok"] = "errors" not in row
    return row


# ---------------------------------------------------------------- report

def fastest_exact(rows, batch: int) -> str:
    """The fastest exact grad-sample mode without options at this batch (the default --grad-sample-mode's
    candidates)."""
    candidates = [r for r in rows if r["batch_size"] == batch and r["ok"] and r.get("exact")
                  and r["variant"] == r["grad_sample_mode"]]
    return min(candidates, key=lambda r: r["dp_ms"])["variant"] if candidates else None


def row_cells(r) -> list:
    if "dp_ms" in r:
        timing = [f"{r['dp_ms']:.1f}", f"{r['non_dp_ms']:.1f}", f"{r['ratio']:.2f}x", f"{r['dp_samples_per_s']:.0f}"]
    else:
        timing = ["-"] * 4
    err = f"{r['grad_rel_err']:.1e}" if "grad_rel_err" in r else "-"
    note = "; ".join([r["skipped"]] if "skipped" in r else
                     [f"{k} failed: {v}" for k, v in r.get("errors", {}).items()])
    return [r["variant"], *timing, str(r.get("exact", "-")), err, f"{r['d_params']:,}", note]


HEADER = ["variant", "DP ms", "plain ms", "DP/plain", "DP samples/s", "exact", "grad err", "D params", "note"]


def format_table(rows) -> str:
    def line(cells):
        return f"{cells[0]:<30}" + " ".join(f"{c:>12}" for c in cells[1:])
    lines = []
    for batch in sorted({r["batch_size"] for r in rows}):
        lines += [f"expected batch {batch}", line(HEADER)]
        lines += [line(row_cells(r)) for r in rows if r["batch_size"] == batch]
    return "\n".join(lines)


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# One DP discriminator step against the plain step ({s['when']})", "",
             f"`{s['command']}`: {s['threads']} thread(s), torch {s['torch']}, opacus {s['opacus']}, {s['cpu']}, "
             f"device {s['device']}; generator {'/'.join(map(str, s['g_channels']))} at {s['bits']} bits, "
             f"discriminator {'/'.join(map(str, s['d_channels']))} unless the variant says d=; median of "
             f"{s['repeats']} interleaved repeats. DP/plain: the DP step's time over the plain step's (goal at most "
             f"{s['ratio_goal']:g}x); exact: the clipped sum matches per-pair clipping by hand (relative error "
             f"below {EXACT_RTOL:g}).", ""]
    for batch in s["batch_sizes"]:
        best = result["fastest_exact"].get(str(batch))
        lines += [f"## Expected batch {batch}", "", "| " + " | ".join(HEADER) + " |", "|---" * len(HEADER) + "|"]
        lines += ["| " + " | ".join(row_cells(r)) + " |" for r in result["rows"] if r["batch_size"] == batch]
        lines += ["", f"Fastest exact mode: {best}.", ""]
    return "\n".join(lines)


def verdicts(rows, batches) -> dict:
    best = {}
    for batch in batches:
        best[str(batch)] = mode = fastest_exact(rows, batch)
        row = next((r for r in rows if r["batch_size"] == batch and r["variant"] == mode), None)
        if row is None:
            print(f"batch {batch}: no mode clipped exactly")
            continue
        verdict = "meets" if row["ratio"] <= RATIO_GOAL else "MISSES"
        print(f"batch {batch}: fastest exact mode {mode} (DP/plain = {row['ratio']:.2f}x, {verdict} the "
              f"{RATIO_GOAL:g}x goal); default in utils/privacy/dp.py: {dp.DEFAULT_GRAD_SAMPLE_MODE}")
    return best


def main(args):
    if maybe_dry_run(args):
        return None
    import opacus
    set_seed(args.seed)
    set_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    split = synthetic_split(args.private_size, args.seed)
    work = [(batch, variant) for batch in args.batch_sizes for variant in args.parsed_variants]
    rows = [run_variant(args, variant, split, batch, device)
            for batch, variant in progress_bar(work, desc="DP step variants", unit="row")]
    print(format_table(rows))
    settings = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": "python " + " ".join(sys.argv),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "opacus": opacus.__version__,
                "cpu": f"{platform.machine()} {platform.processor()}, {os.cpu_count()} CPUs", "device": str(device),
                "batch_sizes": args.batch_sizes, "g_channels": args.g_channels, "bits": args.bits,
                "d_channels": list(Discriminator(channels=args.d_channels).channels), "repeats": args.repeats,
                "warmup": args.warmup, "ratio_goal": RATIO_GOAL, "default": dp.DEFAULT_GRAD_SAMPLE_MODE,
                "platform": platform.platform()}
    result = {"settings": settings, "rows": rows, "fastest_exact": verdicts(rows, args.batch_sizes)}
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, f"dp_step-{time.strftime('%Y%m%d-%H%M%S')}")
    write_json(path + ".json", result)
    write_text(path + ".md", markdown(result))
    print(f"results: {path}.json, {path}.md")
    return path + ".json"


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
