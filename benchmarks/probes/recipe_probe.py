"""Recipe probe: a short non-private teacher run with the recipe's building blocks switched on or off, then its
live and weight-averaged generators measured the way evaluate.py measures them.

Training (the teacher's data and models): the public split, `Generator`/`Discriminator` as in train_teacher.py,
Adam(lr, beta1); per step one discriminator update on a real batch and as many fakes, and after every `d_steps`
discriminator updates one generator update; `--loss` (non-saturating or hinge), `--augment` (DiffAugment policy,
applied to real and fake alike), `--ema-decay` (generator weight average with warm-up; 0: none), `--d-steps` and
`--adaptive-d-steps` (Bie et al.'s ladder). `--steps` counts discriminator updates (= real batches).

Measurement, for the live generator and (when on) the weight average: FD of `--eval-samples` class-balanced
samples to the real test set and improved precision/recall (k = 3, as many real test images as samples), both in
the penultimate features of the reference classifier (a SmallCNN on the 60k real training images, cached under
<out>/reference/); downstream accuracy under the quick or the full protocol of utils/evaluation/metrics.py (which one is
written with the number). Writes a JSON file and two sample grids to --results-dir and prints one markdown row
per generator, ready for benchmarks/results/recipe.md.
"""
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from models import Discriminator, Generator  # noqa: E402
from utils.data.datasets import EpochBatches, add_data_args, load_split, to_unit_range  # noqa: E402
from utils.evaluation.metrics import (PROTOCOL, QUICK_PROTOCOL, feature_statistics, frechet_distance,  # noqa: E402
                                      precision_recall, predict, protocol_accuracy, reference_classifier)
from utils.evaluation.plots import save_samples  # noqa: E402
from utils.gan.augment import diff_augment, parse_policy  # noqa: E402
from utils.gan.dsteps import LADDER, DStepsSchedule, fake_accuracy  # noqa: E402
from utils.gan.ema import WeightAverage  # noqa: E402
from utils.gan.losses import GAN_LOSSES  # noqa: E402
from utils.gan.steps import fixed_inputs, generate, random_inputs  # noqa: E402
from utils.run.checkpoint import versions  # noqa: E402
from utils.run.cli import (add_common_args, make_parser, nonnegative_float, nonnegative_int,  # noqa: E402
                           positive_float, positive_int, resolve_device, run_script, set_seed)
from utils.run.files import write_json  # noqa: E402
from utils.run.lifecycle import batches_from, maybe_dry_run  # noqa: E402

PROTOCOLS = {"quick": QUICK_PROTOCOL, "full": PROTOCOL}


def parse_args(argv=None):
    parser = make_parser(__doc__, "OMP_NUM_THREADS=1 python benchmarks/probes/recipe_probe.py --steps 600 --loss hinge "
                                  "--augment translation,cutout --ema-decay 0.995")
    group = parser.add_argument_group("recipe")
    group.add_argument("--steps", type=positive_int, default=600, help="discriminator updates (real batches)")
    group.add_argument("--batch-size", type=positive_int, default=64)
    group.add_argument("--lr", type=positive_float, default=2e-4)
    group.add_argument("--beta1", type=float, default=0.5)
    group.add_argument("--loss", choices=sorted(GAN_LOSSES), default="non-saturating")
    group.add_argument("--augment", default="none", help="DiffAugment policy, e.g. translation,cutout")
    group.add_argument("--ema-decay", type=nonnegative_float, default=0.995, help="0: no weight average")
    group.add_argument("--d-steps", type=positive_int, default=1, help="discriminator updates per generator update")
    group.add_argument("--adaptive-d-steps", action="store_true", help=f"raise --d-steps along {LADDER}")
    group.add_argument("--g-channels", type=positive_int, nargs=3, default=[256, 128, 64])
    group.add_argument("--d-channels", type=positive_int, nargs=2, default=[64, 128])
    group = parser.add_argument_group("measurement")
    group.add_argument("--eval-samples", type=positive_int, default=5000, help="samples for FD and precision/recall")
    group.add_argument("--protocol", choices=("quick", "full", "none"), default="quick")
    group.add_argument("--reference-epochs", type=positive_int, default=1)
    group.add_argument("--threads", type=nonnegative_int, default=1, help="CPU threads (0: torch's default)")
    group.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results", "recipe"))
    add_data_args(parser)
    add_common_args(parser)
    return parser.parse_args(argv)


def d_update(G, D, optimizer, real, labels, rng, loss, policy) -> float:
    z, fake_labels = random_inputs(G, len(real), rng, real.device)
    with torch.no_grad():
        fake = G(z, fake_labels)
    optimizer.zero_grad(set_to_none=True)
    value = loss.d(D(diff_augment(real, policy, rng), labels), D(diff_augment(fake, policy, rng), fake_labels))
    value.backward()
    optimizer.step()
    return value.item()


def g_update(G, D, optimizer, batch_size, rng, loss, policy, device) -> float:
    z, labels = random_inputs(G, batch_size, rng, device)
    optimizer.zero_grad(set_to_none=True)
    value = loss.g(D(diff_augment(G(z, labels), policy, rng), labels))
    value.backward()
    optimizer.step()
    return value.item()


def train(args, split, device) -> dict:
    """(live G, weight average or None, training log) after args.steps discriminator updates."""
    set_seed(args.seed)
    G = Generator(channels=args.g_channels, bits=32).to(device)
    D = Discriminator(channels=args.d_channels).to(device)
    g_opt = torch.optim.Adam(G.parameters(), args.lr, betas=(args.beta1, 0.999))
    d_opt = torch.optim.Adam(D.parameters(), args.lr, betas=(args.beta1, 0.999))
    loss, policy, rng = GAN_LOSSES[args.loss], parse_policy(args.augment), torch.Generator().manual_seed(args.seed)
    average = WeightAverage(G, args.ema_decay) if args.ema_decay > 0 else None
    schedule = DStepsSchedule(args.d_steps, adaptive=args.adaptive_d_steps)
    since_g, g_value, log, start = 0, float("nan"), [], time.time()
    for step, (real, labels) in enumerate(batches_from(EpochBatches(split, args.batch_size, args.seed), 0,
                                                            args.steps), start=1):
        d_value = d_update(G, D, d_opt, real.to(device), labels.to(device), rng, loss, policy)
        since_g += 1
        if since_g >= schedule.d_steps:
            accuracy = fake_accuracy(G, D, args.batch_size, rng, device) if args.adaptive_d_steps else None
            g_value = g_update(G, D, g_opt, args.batch_size, rng, loss, policy, device)
            schedule.after_g_step(accuracy)
            since_g = 0
            if average is not None:
                average.update(G)
        if step % 100 == 0 or step == args.steps:
            log.append({"step": step, "d_loss": d_value, "g_loss": g_value, "d_steps": schedule.d_steps,
                        "minutes": (time.time() - start) / 60})
            print(log[-1], flush=True)
    return {"live": G, "average": average.model if average else None, "log": log,
            "train_minutes": (time.time() - start) / 60}


def measure(G, name, context, args, device) -> dict:
    """FD, precision/recall and downstream accuracy of G, from one pool of class-balanced samples."""
    protocol = PROTOCOLS.get(args.protocol)
    size = max(args.eval_samples, protocol.num_samples if protocol else 0)
    z, labels = G.sample_inputs(size, generator=torch.Generator().manual_seed(args.seed + 17))
    images = generate(G, z, labels, device=device)
    features = predict(context["reference"], images[:args.eval_samples], features=True)
    row = {"generator": name, "fd": frechet_distance(*feature_statistics(features.numpy()), *context["test_stats"])}
    row.update(precision_recall(context["test_features"][:args.eval_samples], features))
    if protocol:
        result = protocol_accuracy(images[:protocol.num_samples], labels[:protocol.num_samples],
                                   *context["test"], protocol, device, desc=f"downstream {name}")
        row.update(downstream=result["test_accuracy"], downstream_epoch=result["epoch"], protocol=protocol.name)
    z, labels = fixed_inputs(G)
    save_samples(generate(G, z, labels, device=device), os.path.join(context["dir"], f"samples-{name}.png"), 10)
    return row


def prepare(args, device, run_dir) -> dict:
    train = load_split(args.dataset, "all", args.data_root, args.public_size, args.partition_seed)
    test = load_split(args.dataset, "test", args.data_root, args.public_size, args.partition_seed)
    train, test = (to_unit_range(train.images), train.labels), (to_unit_range(test.images), test.labels)
    settings = {"epochs": args.reference_epochs, "seed": 0, "max_steps": None}
    model, info = reference_classifier(os.path.join(args.out, "reference"), args.dataset, train, test, settings,
                                       device)
    order = torch.randperm(len(test[1]), generator=torch.Generator().manual_seed(args.seed + 29))
    test_features = predict(model, test[0], features=True)
    return {"reference": model, "reference_info": info, "test": test, "dir": run_dir,
            "test_stats": feature_statistics(test_features.numpy()), "test_features": test_features[order]}


def markdown_row(args, row, minutes) -> str:
    settings = (f"loss {args.loss}, augment {args.augment}, EMA {args.ema_decay or 'off'}, d-steps "
                f"{'adaptive from ' if args.adaptive_d_steps else ''}{args.d_steps}, lr {args.lr:g}, batch "
                f"{args.batch_size}, G {'/'.join(map(str, args.g_channels))}")
    downstream = f"{100 * row['downstream']:.1f} % ({row['protocol']})" if "downstream" in row else "-"
    return (f"| {args.desc or '-'} | {settings} | {args.steps} | {minutes:.1f} | {row['generator']} | "
            f"{row['fd']:.2f} | {row['precision']:.3f} | {row['recall']:.3f} | {downstream} |")


def main(args):
    parse_policy(args.augment)  # refuse a bad policy before anything runs
    if maybe_dry_run(args):
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    run_dir = os.path.join(args.results_dir, time.strftime("%Y%m%d-%H%M%S") + (f"-{args.desc}" if args.desc else ""))
    os.makedirs(run_dir, exist_ok=True)
    split = load_split(args.dataset, args.split, args.data_root, args.public_size, args.partition_seed)
    trained = train(args, split, device)
    start = time.time()
    context = prepare(args, device, run_dir)
    generators = {"live": trained["live"], "average": trained["average"]}
    rows = [measure(G, name, context, args, device) for name, G in generators.items() if G is not None]
    eval_minutes = (time.time() - start) / 60
    write_json(os.path.join(run_dir, "probe.json"),
               {"settings": vars(args), "rows": rows, "train_log": trained["log"], "versions": versions(),
                "train_minutes": trained["train_minutes"], "eval_minutes": eval_minutes,
                "reference_classifier": context["reference_info"], "machine": platform.platform()})
    for row in rows:
        print(markdown_row(args, row, trained["train_minutes"]))
    print(f"train {trained['train_minutes']:.1f} min, measure {eval_minutes:.1f} min; written {run_dir}")
    return run_dir


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
