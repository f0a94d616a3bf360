"""Numeric precision of the non-private work: float32, or bfloat16 autocast scoped to each forward pass
(docs/DESIGN.md, "Precision").

`--precision auto|fp32|bf16` (teacher without --dp, student, distillation set, evaluation). With bf16 every forward
pass of a network runs under `torch.autocast(dtype=torch.bfloat16)` and its output comes back as float32; losses,
backward bookkeeping, optimiser steps and the weight average stay outside autocast, in float32, on float32 master
weights. The scope matters: an autocast context that stays open across optimiser steps keeps serving the bf16 copies
of the weights it cast first (autocast caches the casts of leaf tensors until the outermost context exits), so the
networks would train on stale weights (benchmarks/results/recipe.md, "bf16: where autocast may go"). One context
per forward pass closes before any weight changes.

fp32 is exactly the code path of before this option existed (`wrap` returns the network itself): its results are
bit-identical. bf16 may also put the networks in channels-last memory format where that measured faster
(`CHANNELS_LAST`). `auto` is bf16 where the hardware runs it natively (a CPU with AVX-512 BF16 or AMX, or a CUDA
device that supports bf16) and fp32 elsewhere; the scripts print which. The DP paths stay float32.
"""
import contextlib
from dataclasses import dataclass

import torch

from utils.run.cli import UserError

PRECISIONS = ("auto", "fp32", "bf16")
# Where channels-last measured faster in bf16 (benchmarks/bench_precision.py; benchmarks/results/precision.md)
CHANNELS_LAST = {"teacher": True, "student": True, "classifier": True, "sampling": False}


def bf16_support(device: torch.device) -> tuple:
    """(supported, why): whether `device` runs bfloat16 natively, and the reason in words."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "CUDA device with bf16" if ok else "this CUDA device has no native bf16"
    if device.type == "cpu":
        features = [name for name, present in (("AVX-512 BF16", torch.cpu._is_avx512_bf16_supported()),
                                               ("AMX", torch.cpu._is_amx_tile_supported())) if present]
        return (True, f"this CPU has {' and '.join(features)}") if features else \
            (False, "this CPU has neither AVX-512 BF16 nor AMX")
    return False, f"no bf16 autocast on {device.type}"


@dataclass(frozen=True)
class Precision:
    """How the forward passes of one process run: `name` fp32 or bf16 on `device_type`, channels-last or not."""
    name: str = "fp32"
    device_type: str = "cpu"
    channels_last: bool = False
    reason: str = ""

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def autocast(self):
        """The context of one forward pass: bf16 autocast, or nothing."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    def wrap(self, network):
        """What a step calls instead of `network`: the network itself in fp32, else `AutocastForward`."""
        return AutocastForward(network, self) if self.bf16 else network

    def prepare(self, *networks):
        """Put the networks in channels-last format where this precision asks for it (weights stay float32)."""
        if self.channels_last:
            for network in networks:
                network.to(memory_format=torch.channels_last)
        return networks

    def describe(self) -> str:
        text = "bf16 autocast" + (" + channels-last" if self.channels_last else "") if self.bf16 else "fp32"
        return f"{text} ({self.reason})" if self.reason else text

    def for_use(self, use: str) -> "Precision":
        """This precision with the channels-last choice measured for `use` (a key of CHANNELS_LAST)."""
        return Precision(self.name, self.device_type, self.bf16 and CHANNELS_LAST[use], self.reason)


FP32 = Precision()


class AutocastForward:
    """Calls a network under its precision's autocast and returns float32; every attribute is the network's."""

    def __init__(self, network, precision: Precision):
        self.network, self.precision = network, precision

    def __call__(self, *inputs):
        with self.precision.autocast():
            output = self.network(*inputs)
        return output.float()

    def __getattr__(self, name):
        return getattr(self.network, name)


def resolve_precision(requested: str, device, allowed: bool = True, why_not: str = "") -> Precision:
    """The Precision of `--precision` on `device`. `auto` picks bf16 where it is native, else fp32; `bf16` where
    it is not native, or where the caller does not allow it (`allowed` False, `why_not` saying why), is refused."""
    device = torch.device(device)
    requested = requested or "auto"
    if requested not in PRECISIONS:
        raise UserError(f"--precision {requested}: choose from {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return Precision("fp32", device.type, reason="asked for")
    if not allowed:
        if requested == "bf16":
            raise UserError(f"--precision bf16: {why_not}")
        return Precision("fp32", device.type, reason=f"auto: {why_not}")
    supported, reason = bf16_support(device)
    if requested == "bf16" and not supported:
        raise UserError(f"--precision bf16: {reason}; use --precision fp32 (or auto)")
    if supported:
        return Precision("bf16", device.type, reason=("auto: " if requested == "auto" else "") + reason)
    return Precision("fp32", device.type, reason=f"auto: {reason}")


def add_precision_arg(group):
    group.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="numeric precision of the forward passes: bf16 autocast (master weights, optimiser "
                            "state and weight average stay float32), fp32, or auto (default): bf16 where the "
                            "hardware runs it natively (AVX-512 BF16 or AMX, CUDA), else fp32; the log says which")


def announce(precision: Precision, what: str):
    """One line in the log saying which precision `what` runs in, and why."""
    print(f"{what}: precision {precision.describe()}", flush=True)
