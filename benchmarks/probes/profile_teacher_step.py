"""Benchmark: where a teacher training step's time goes on this CPU, to know what a faster preset can change.

Times, in one process, the default teacher generator's forward and forward+backward and the discriminator's
forward+backward on one batch of synthetic inputs (the cost does not depend on the pixels), and the share of
the generator's forward+backward spent in convolution ops (torch.profiler). Then each of the generator's
transposed convolutions alone, forward+backward, in the default memory layout and in channels-last. Medians of
--repeats calls after one warm-up call. Prints a table and writes JSON to benchmarks/results/.

  OMP_NUM_THREADS=1 python benchmarks/probes/profile_teacher_step.py --threads 1
"""
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models import Discriminator, Generator  # noqa: E402
from utils.compression.cost import median_seconds  # noqa: E402
from utils.run.cli import make_parser, nonnegative_int, positive_int, run_script, set_seed, set_threads  # noqa: E402
from utils.run.files import write_json  # noqa: E402

CONV_OPS = ("convolution", "conv_transpose", "mkldnn_convolution")  # substrings of the profiler's op names


def parse_args(argv=None):
    parser = make_parser(__doc__, "python benchmarks/probes/profile_teacher_step.py --batch-size 32")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per step")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed calls per measurement")
    parser.add_argument("--threads", type=nonnegative_int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    return parser.parse_args(argv)


def median_ms(call, repeats: int) -> float:
    return 1000 * median_seconds(call, repeats, warmup=1)


def conv_share(call) -> float:
    """Share of the profiled self CPU time spent in convolution ops (forward and backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if any(op in e.key for op in CONV_OPS))
    return conv / total


def model_timings(batch: int, repeats: int) -> dict:
    G, D = Generator(), Discriminator()
    z, labels = G.sample_inputs(batch, generator=torch.Generator().manual_seed(0))
    images = torch.rand(batch, 1, 28, 28) * 2 - 1

    def g_forward():
        with torch.no_grad():
            G(z, labels)

    def g_forward_backward():
        G(z, labels).sum().backward()

    def d_forward_backward():
        D(images, labels).sum().backward()

    return {"g_forward_ms": median_ms(g_forward, repeats), "g_forward_backward_ms": median_ms(g_forward_backward, repeats),
            "d_forward_backward_ms": median_ms(d_forward_backward, repeats),
            "g_conv_share": conv_share(g_forward_backward)}


def layer_timings(batch: int, repeats: int) -> list:
    """Each transposed conv of the default generator alone, forward+backward, default vs channels-last layout."""
    G = Generator()
    rows, side = [], 1
    for name in G.prunable_layers:
        conv = getattr(G, name).conv
        layer = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                   bias=False)
        x = torch.randn(batch, conv.in_channels, side, side)
        timed = {}
        for layout in (torch.contiguous_format, torch.channels_last):
            module, inputs = layer.to(memory_format=layout), x.to(memory_format=layout).requires_grad_()
            timed[str(layout).split(".")[-1]] = median_ms(lambda: module(inputs).sum().backward(), repeats)
        out_side = (side - 1) * conv.stride[0] - 2 * conv.padding[0] + conv.kernel_size[0]
        # a transposed conv scatters every input position into k x k outputs of every output channel
        macs = batch * side ** 2 * conv.in_channels * conv.out_channels * conv.kernel_size[0] ** 2
        rows.append({"layer": name, "in": conv.in_channels, "out": conv.out_channels, "side": f"{side}->{out_side}",
                     "forward_macs": macs, **timed,
                     "channels_last_speedup": timed["contiguous_format"] / timed["channels_last"]})
        side = out_side
    return rows


def main(args):
    set_seed(0)
    set_threads(args.threads)
    result = {"batch_size": args.batch_size, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
              **model_timings(args.batch_size, args.repeats), "layers": layer_timings(args.batch_size, args.repeats)}
    print(f"batch {args.batch_size}, {result['threads']} thread(s): G forward {result['g_forward_ms']:.1f} ms, "
          f"G forward+backward {result['g_forward_backward_ms']:.1f} ms "
          f"({100 * result['g_conv_share']:.0f} % in convolution ops), "
          f"D forward+backward {result['d_forward_backward_ms']:.1f} ms")
    print("layer   in -> out  side      forward MACs   fwd+bwd ms (default)   fwd+bwd ms (channels-last)   speed-up")
    for row in result["layers"]:
        print(f"{row['layer']:7} {row['in']:3} -> {row['out']:3}  {row['side']:8} {row['forward_macs']:14,}   "
              f"{row['contiguous_format']:20.1f}   {row['channels_last']:26.1f}   {row['channels_last_speedup']:.2f}x")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.results_dir, f"teacher-step-profile-{stamp}.json")
    write_json(path, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    raise SystemExit(run_script(main, parse_args))
