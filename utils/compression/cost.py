"""Device cost of a generator: parameters, MACs per image, CPU latency at batch 1 and throughput at batch 256.

Timings are medians over repeats after a warm-up, in one process; models compared with each other are timed
interleaved (`interleaved_speed`: rounds that time each in turn), so a change of the machine's load hits all alike;
compare models only within one run. The cost report's rows (`cost_row`, `timed_rows`, `state_dict_bytes`), their
ratios to the teacher (`add_ratios` to the eager teacher, `add_same_runtime_ratios` to the teacher in the row's own
runtime: the like-for-like headline) and its table (`format_table`) are here too, shared by every stage's and
benchmark's report.
"""
import io
import math
import statistics
import time

import torch
from torch import nn


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _conv_macs(module, inputs, output) -> int:
    if isinstance(module, nn.ConvTranspose2d):  # every input pixel scatters into kh*kw*out/groups outputs
        x = inputs[0]
        return x[0].numel() * (module.out_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
    per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
    return output[0].numel() * per_output


@torch.no_grad()
def count_macs(generator_model: nn.Module) -> int:
    """Multiply-accumulates of one image through every conv and linear layer."""
    total, handles = [0], []

    def hook(module, inputs, output):
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            total[0] += _conv_macs(module, inputs, output)
        elif isinstance(module, nn.Linear):
            total[0] += module.in_features * module.out_features

    for module in generator_model.modules():
        handles.append(module.register_forward_hook(hook))
    was_training = generator_model.training
    generator_model.eval()
    device = next(generator_model.parameters()).device
    z, labels = generator_model.sample_inputs(1, device=device)
    generator_model(z, labels)
    generator_model.train(was_training)
    for handle in handles:
        handle.remove()
    return total[0]


ROUNDS = 5  # rounds of an interleaved timing (`interleaved_seconds`)


def median_seconds(call, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of `call()` over `repeats` calls, after `warmup` untimed ones."""
    return statistics.median(interleaved_seconds({"call": call}, repeats, warmup, rounds=1)["call"])


def interleaved_seconds(calls: dict, repeats: int, warmup: int = 3, rounds: int = None, desc: str = None) -> dict:
    """{name: [seconds of each timed call]} for `calls` ({name: call()}) timed in one process, interleaved: the
    repeats are split into `rounds` rounds (default ROUNDS), and every round times each call in turn, in a burst
    after one untimed call (`warmup` of them in the first round). A change of the machine's load during the
    measurement hits all calls alike, and each burst runs with its own weights in cache (timed call by call, a
    small model would pay for the cache that a large one evicted before it)."""
    from utils.run.cli import progress_bar
    rounds = max(1, min(ROUNDS if rounds is None else rounds, repeats))
    burst = math.ceil(repeats / rounds)
    times = {name: [] for name in calls}
    for round_ in progress_bar(range(rounds), desc=desc, leave=False, disable=desc is None):
        for name, call in calls.items():
            for _ in range(warmup if round_ == 0 else 1):
                call()
            for _ in range(burst):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return times


def _bound(run, z, labels):
    return lambda: run(z, labels)


@torch.inference_mode()
def interleaved_speed(runs: dict, latency_repeats: int = 50, throughput_repeats: int = 10,
                      throughput_batch: int = 256, warmup: int = 3) -> dict:
    """{name: {"latency_ms", "images_per_s"}} of `runs` ({name: (generator, run(z, labels) or None for the
    generator itself)}; the generator gives the seeded inputs): CPU latency at batch 1 and throughput at batch
    `throughput_batch`, medians of `interleaved_seconds` (one process, rounds that time each run in turn)."""
    result = {name: {} for name in runs}
    for key, batch, repeats in (("latency_ms", 1, latency_repeats),
                                ("images_per_s", throughput_batch, throughput_repeats)):
        calls = {}
        for name, (model, run) in runs.items():
            model.eval()
            calls[name] = _bound(run or model, *model.sample_inputs(batch, generator=torch.Generator().manual_seed(0)))
        seconds = interleaved_seconds(calls, repeats, warmup,
                                      desc=f"timing {len(runs)} models at batch {batch}" if len(runs) > 1 else None)
        for name, samples in seconds.items():
            median = statistics.median(samples)
            result[name][key] = median * 1e3 if key == "latency_ms" else batch / median
    return result


def measure_speed(generator_model, run=None, latency_repeats: int = 50, throughput_repeats: int = 10,
                  throughput_batch: int = 256) -> dict:
    """CPU latency (ms, batch 1) and throughput (images/s, batch `throughput_batch`) of `run` (default: the
    model in eval mode)."""
    return interleaved_speed({"model": (generator_model, run)}, latency_repeats, throughput_repeats,
                             throughput_batch)["model"]


def state_dict_bytes(module: torch.nn.Module) -> int:
    """Size of `torch.save(module.state_dict())`: what a float checkpoint of the generator alone takes."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buffer)
    return buffer.getbuffer().nbytes


# ---------------------------------------------------------------- device cost report

COST_METRICS = {  # key -> (label, format); ratios are always value / reference value
    "parameters": ("parameters", "{:,.0f}"),
    "macs": ("MACs/image", "{:,.0f}"),
    "bytes": ("bytes on disk", "{:,.0f}"),
    "latency_ms": ("latency ms (b=1)", "{:.3f}"),
    "images_per_s": ("images/s (big batch)", "{:,.1f}"),
}
COST_KEYS = tuple(COST_METRICS)


def cost_row(model: nn.Module, bytes_on_disk: int, run=None, speed: dict = None) -> dict:
    """Parameters, MACs per image and bytes of `model`; with `speed` (measure_speed keyword arguments, may be
    empty), also CPU latency at batch 1 and throughput of `run` (default: the model itself)."""
    row = {"parameters": count_parameters(model), "macs": count_macs(model), "bytes": int(bytes_on_disk)}
    if speed is not None:
        row.update(measure_speed(model, run=run, **speed))
    return row


def timed_rows(entries: dict, speed: dict = None) -> dict:
    """Cost rows of `entries` ({name: (generator, run or None, bytes on disk)}), with `speed` (interleaved_speed
    keyword arguments, may be empty) their latency and throughput measured together: one process, interleaved."""
    rows = {name: cost_row(model, size) for name, (model, _, size) in entries.items()}
    if speed is not None:
        measured = interleaved_speed({name: (model, run) for name, (model, run, _) in entries.items()}, **speed)
        for name, values in measured.items():
            rows[name].update(values)
    return rows


# The like-for-like ratios (docs/DESIGN.md, "What ships"): a row's costs over the teacher's in the same runtime,
# measured in the same process. A row whose name ends in RUNTIME_SUFFIX runs in ONNX Runtime; its teacher is the
# teacher's float ONNX model (row TEACHER_RUNTIME). `vs_teacher` stays the ratio to the eager teacher.
TEACHER, RUNTIME_SUFFIX = "teacher", " (ONNX Runtime)"
TEACHER_RUNTIME = TEACHER + RUNTIME_SUFFIX
SAME_RUNTIME = "vs_teacher_same_runtime"


def ratios(row: dict, base: dict) -> dict:
    """Each cost of `row` divided by the baseline's (latency < 1 and images/s > 1 are better)."""
    return {key: row[key] / base[key] for key in COST_KEYS if key in row and base.get(key)}


def add_ratios(rows: dict, reference: str = TEACHER, baseline: dict = None, key: str = None) -> dict:
    """Adds `key` (default `vs_<reference>`) to every row: `ratios` to the baseline (default: `rows[reference]`),
    or None where there is no baseline."""
    base = rows.get(reference) if baseline is None else baseline
    for row in rows.values():
        row[key or f"vs_{reference}"] = ratios(row, base) if base else None
    return rows


def add_same_runtime_ratios(rows: dict, runtime_rows=(), baseline: dict = None) -> dict:
    """Adds SAME_RUNTIME to every row: ratios to the teacher in the row's own runtime, the teacher's float ONNX
    model (`baseline`, default rows[TEACHER_RUNTIME]) for a row run by ONNX Runtime (name ending in
    RUNTIME_SUFFIX, or in `runtime_rows`), the eager teacher (rows[TEACHER]) for the others; None where that
    teacher is missing."""
    in_runtime = baseline or rows.get(TEACHER_RUNTIME)
    for name, row in rows.items():
        base = in_runtime if name.endswith(RUNTIME_SUFFIX) or name in runtime_rows else rows.get(TEACHER)
        row[SAME_RUNTIME] = ratios(row, base) if base else None
    return rows


def format_table(rows: dict, reference: str = TEACHER) -> str:
    """The cost rows as a text table: each cost with its ratio to the teacher in the same runtime (SAME_RUNTIME,
    where the rows have it, else `vs_<reference>`), and for the rows run by ONNX Runtime the latency and
    throughput ratios to the eager teacher as a second, labelled pair of columns."""
    keys = [key for key in COST_METRICS if all(key in row for row in rows.values())]
    same = all(row.get(SAME_RUNTIME) is not None for row in rows.values())
    eager_keys = [key for key in ("latency_ms", "images_per_s") if key in keys] if same else []
    header = (["model"] + [part for key in keys for part in (COST_METRICS[key][0], "xT")]
              + [f"{COST_METRICS[key][0].split(' (')[0]} x eager T" for key in eager_keys])
    lines = [header]
    for name, row in rows.items():
        like = (row.get(SAME_RUNTIME) if same else row.get(f"vs_{reference}")) or {}
        eager = (row.get(f"vs_{reference}") or {}) if name.endswith(RUNTIME_SUFFIX) else {}
        cells = [name]
        for key in keys:
            cells += [COST_METRICS[key][1].format(row[key]), f"{like[key]:.3g}" if key in like else "-"]
        cells += [f"{eager[key]:.3g}" if key in eager else "-" for key in eager_keys]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    note = ("xT: ratio to the teacher in the same runtime (ONNX Runtime rows: the teacher's float ONNX model), "
            "timed in this process, interleaved; x eager T: to the teacher in eager torch" if same
            else f"x = ratio to the {reference}")
    return "\n".join([text[0], "-" * len(text[0])] + text[1:]) + f"\n({note})"
