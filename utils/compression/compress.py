"""Stage 4's pure function: a GAN Slimming student -> the compact generator without its dead channels.

A channel of a prunable block is *removable* when its output is exactly 0 for every input: its BatchNorm gamma is
exactly 0 (then the normalised value is multiplied away) and its beta is <= 0 (ReLU maps it to 0; quantising 0
gives 0). A channel the student marked dead (`alive` False) has gamma = beta = 0 and is therefore removable; a
channel whose gamma is 0 but whose beta is positive outputs a constant, is NOT dead and is kept (removing it would
change the function).

The compact generator is the same `Generator` class with only the live channels and the same bit width. From the
student it copies, per block: the transposed conv's output channels (dim 1 of its (in, out, kh, kw) weight) and the
next layer's input channels (dim 0 of the next transposed conv, dim 1 of the final (out, in, kh, kw) `to_image`
conv); the BatchNorm weight, bias, running mean/var, `alive` and `num_batches_tracked`; and each conv's per-output-
channel `weight_scale`, sliced on output channels only and never recomputed, so the compact model keeps the
student's integer grid even where the largest weight of an output channel sat in a removed input channel.

A block whose channels are all dead keeps one (dead) channel, because a width of 0 cannot be represented; it
outputs exactly 0, as in the student.

The check that the two compute the same function (`checked_difference`) runs in float32 and, only when that finds a
difference above MAX_ABS_DIFF, again in float64: a conv over fewer input channels adds in another order, and in
float32 a 1e-7 difference that lands on one of the activation quantiser's rounding boundaries moves a value by a whole
level (4/255), which then shows in the image (measured: 0.0062 on a real student whose float64 difference is 0).
"""
import copy
import math

import torch

from models import Generator

MAX_ABS_DIFF = 1e-5  # compact(z, y) must equal student(z, y) to this tolerance in eval mode


def removable_mask(generator: Generator) -> list:
    """Per prunable block, a bool tensor: True where the channel's output is exactly 0 for every input."""
    masks = []
    for block in generator.blocks():
        gamma, beta = block.norm.weight.detach(), block.norm.bias.detach()
        masks.append((gamma == 0) & (beta <= 0))
    return masks


def kept_channels(generator: Generator) -> list:
    """Per prunable block, the sorted indices of the channels the compact model keeps (at least one)."""
    kept = []
    for mask in removable_mask(generator):
        keep = torch.nonzero(~mask).flatten()
        kept.append(keep if len(keep) else torch.zeros(1, dtype=torch.long))
    return kept


def _slice(tensor: torch.Tensor, dim: int, index) -> torch.Tensor:
    if index is None:
        return tensor.detach().clone()
    return tensor.detach().index_select(dim, index).clone()


def sliced_state_dict(student: Generator, kept: list) -> dict:
    """The student's state with only the `kept` channels of every prunable block (see the module docstring)."""
    state = student.state_dict()
    out = {"embed.weight": state["embed.weight"].clone()}
    previous = None  # kept input channels of the current layer (None: all of them)
    for name, keep in zip(student.prunable_layers, kept):
        weight = _slice(state[f"{name}.conv.weight"], 0, previous)  # (in, out, kh, kw)
        out[f"{name}.conv.weight"] = _slice(weight, 1, keep)
        out[f"{name}.conv.weight_scale"] = _slice(state[f"{name}.conv.weight_scale"], 0, keep)
        for key in ("weight", "bias", "running_mean", "running_var", "alive"):
            out[f"{name}.norm.{key}"] = _slice(state[f"{name}.norm.{key}"], 0, keep)
        out[f"{name}.norm.num_batches_tracked"] = state[f"{name}.norm.num_batches_tracked"].clone()
        previous = keep
    out["to_image.weight"] = _slice(state["to_image.weight"], 1, previous)  # (out, in, kh, kw)
    for key in ("to_image.bias", "to_image.weight_scale"):
        out[key] = state[key].clone()
    return out


def compact_model_args(student: Generator, kept: list) -> dict:
    return {**student.model_args(), "channels": [len(keep) for keep in kept]}


def compress(student: Generator) -> Generator:
    """The compact generator: `student` without its removable channels, same function in eval mode (pure: the
    student is not modified). Returned in eval mode, on the student's device."""
    kept = [keep.to(student.embed.weight.device) for keep in kept_channels(student)]
    compact = Generator(**compact_model_args(student, kept)).to(student.embed.weight.device)
    state = sliced_state_dict(student, kept)
    expected = compact.state_dict()
    bad = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if bad or len(state) != len(expected):
        extra = sorted(set(state) - set(expected))
        raise RuntimeError(f"compact state does not match the Generator layout: {bad or extra}")
    compact.load_state_dict(state)  # loads the stored weight scales too: never recomputed
    return compact.eval()


def summary(student: Generator, compact: Generator) -> dict:
    """Widths before and after, per block."""
    masks = removable_mask(student)
    return {"layers": list(student.prunable_layers),
            "widths_before": list(student.channels),
            "widths_after": list(compact.channels),
            "removed": [int(m.sum()) for m in masks],
            "all_dead_layers": [name for name, m in zip(student.prunable_layers, masks) if bool(m.all())],
            "bits": student.bits}


def checked_difference(student: torch.nn.Module, compact: torch.nn.Module, num_samples: int = 4096,
                       seed: int = 0) -> tuple:
    """(largest difference, "float32" or "float64"): float32 first (fast); above MAX_ABS_DIFF, the float64 one
    (see the module docstring), which is then what the guard compares with MAX_ABS_DIFF."""
    diff = max_abs_difference(student, compact, num_samples, seed)
    if diff <= MAX_ABS_DIFF:
        return diff, "float32"
    return max_abs_difference(student, compact, num_samples, seed, dtype=torch.float64), "float64"


@torch.no_grad()
def max_abs_difference(a: torch.nn.Module, b: torch.nn.Module, num_samples: int = 4096, seed: int = 0,
                       batch_size: int = 512, dtype: torch.dtype = None) -> float:
    """Largest |a(z, y) - b(z, y)| over `num_samples` fixed, seeded inputs (balanced labels), both in eval mode;
    with `dtype`, evaluated on copies of both converted to it (the models themselves are untouched)."""
    if dtype is not None:
        a, b = (copy.deepcopy(model).to(dtype) for model in (a, b))
    modes = a.training, b.training
    a.eval(), b.eval()
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(num_samples, a.nz, generator=rng)
    if dtype is not None:
        z = z.to(dtype)
    labels = torch.arange(num_samples) % a.num_classes
    device = a.embed.weight.device
    worst = 0.0
    for i in range(0, num_samples, batch_size):
        zb, yb = z[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        diff = (a(zb, yb) - b(zb, yb)).abs().max().item()
        worst = diff if not math.isfinite(diff) else max(worst, diff)  # a NaN must never pass as 0
        if not math.isfinite(worst):
            break
    a.train(modes[0]), b.train(modes[1])
    return worst if math.isfinite(worst) else math.inf

