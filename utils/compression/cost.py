"""Device cost of a generator: parameters, MACs per image, CPU latency at batch 1 and throughput at batch 256.

Timings are medians over repeats after a warm-up, in one process; compare models only within one run. The cost
report's rows (`cost_row`, `state_dict_bytes`), their ratios to a reference (`add_ratios` over `COST_KEYS`) and
its table (`format_table`) are here too, shared by every stage's and benchmark's report.
"""
import io
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


def median_seconds(call, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of `call()` over `repeats` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def time_forward(run, z, labels, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of `run(z, labels)` over `repeats` calls."""
    return median_seconds(lambda: run(z, labels), repeats, warmup)


def measure_speed(generator_model, run=None, latency_repeats: int = 50, throughput_repeats: int = 10,
                  throughput_batch: int = 256) -> dict:
    """CPU latency (ms, batch 1) and throughput (images/s, batch `throughput_batch`) of `run` (default: the
    model in eval mode)."""
    generator_model.eval()
    run = run or generator_model
    z1, y1 = generator_model.sample_inputs(1, generator=torch.Generator().manual_seed(0))
    zb, yb = generator_model.sample_inputs(throughput_batch, generator=torch.Generator().manual_seed(0))
    latency = time_forward(run, z1, y1, latency_repeats)
    batch_time = time_forward(run, zb, yb, throughput_repeats)
    return {"latency_ms": latency * 1e3, "images_per_s": throughput_batch / batch_time}


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


def add_ratios(rows: dict, reference: str = "teacher", baseline: dict = None) -> dict:
    """Adds `vs_<reference>` to every row: each cost divided by the baseline's (default: `rows[reference]`;
    latency < 1 and images/s > 1 are better), or None where there is no baseline."""
    base = rows.get(reference) if baseline is None else baseline
    for row in rows.values():
        row[f"vs_{reference}"] = ({key: row[key] / base[key] for key in COST_KEYS if key in row and base.get(key)}
                                  if base else None)
    return rows


def format_table(rows: dict, reference: str = "teacher") -> str:
    keys = [key for key in COST_METRICS if all(key in row for row in rows.values())]
    header = ["model"] + [part for key in keys for part in (COST_METRICS[key][0], "x")]
    lines = [header]
    for name, row in rows.items():
        ratios = row.get(f"vs_{reference}", {})
        cells = [name]
        for key in keys:
            cells += [COST_METRICS[key][1].format(row[key]), f"{ratios[key]:.3g}" if key in ratios else "-"]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    return "\n".join([text[0], "-" * len(text[0])] + text[1:]) + f"\n(x = ratio to the {reference})"
