"""Real-data ceilings of the downstream protocol: the protocol's classifier trained on real images instead of
generated ones, tested on the real test set (utils.evaluation.metrics.real_data_ceiling).

`--sets public all` measures the two ceilings the results tables quote: the public 10k split (what a generator
trained on the public split could at best carry over) and the whole 60k training set. The same share is held out
to choose the epoch as the protocol holds out of its generated samples (1/12). Writes one JSON file per run
to --results-dir with the settings, the accuracies, the chosen epochs and the wall time.
"""
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from utils.data.datasets import add_data_args, load_split, to_unit_range  # noqa: E402
from utils.evaluation.metrics import PROTOCOL, QUICK_PROTOCOL, real_data_ceiling  # noqa: E402
from utils.run.checkpoint import versions  # noqa: E402
from utils.run.cli import add_common_args, make_parser, nonnegative_int, resolve_device, run_script  # noqa: E402
from utils.run.files import write_json  # noqa: E402
from utils.run.lifecycle import maybe_dry_run  # noqa: E402


def parse_args(argv=None):
    parser = make_parser(__doc__, "OMP_NUM_THREADS=1 python benchmarks/protocol_ceilings.py --sets public all")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--sets", nargs="+", choices=("public", "all", "private"), default=["public", "all"])
    group.add_argument("--quick", action="store_true", help="the quick variant of the protocol")
    group.add_argument("--threads", type=nonnegative_int, default=1, help="CPU threads (0: torch's default)")
    group.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    add_data_args(parser)
    add_common_args(parser)
    return parser.parse_args(argv)


def measure(args, name: str, test, device) -> dict:
    split = load_split(args.dataset, name, args.data_root, args.public_size, args.partition_seed)
    protocol = QUICK_PROTOCOL if args.quick else PROTOCOL
    start = time.time()
    result = real_data_ceiling(to_unit_range(split.images), split.labels, *test, protocol, device)
    result.update(set=name, size=len(split), wall_s=time.time() - start)
    print(f"{name} ({len(split)} real images): {100 * result['test_accuracy']:.2f}% at epoch {result['epoch']} "
          f"(hold-out curve {[round(a, 4) for a in result['holdout_accuracy']]}), {result['wall_s'] / 60:.1f} min",
          flush=True)
    return result


def main(args):
    if maybe_dry_run(args):
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    test_split = load_split(args.dataset, "test", args.data_root, args.public_size, args.partition_seed)
    test = (to_unit_range(test_split.images), test_split.labels)
    results = [measure(args, name, test, device) for name in args.sets]
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, f"protocol-ceilings-{'quick' if args.quick else 'full'}-"
                                          f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json(path, {"results": results, "settings": vars(args), "threads": torch.get_num_threads(),
                      "machine": platform.platform(), "cpus": os.cpu_count(), "versions": versions()})
    print(f"written {path}")
    return path


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
