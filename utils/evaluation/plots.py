"""Every figure of the pipeline, as PNG: sample grids, metric curves, cost bars, the quality/size trade-off."""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from utils.compression.cost import COST_METRICS  # noqa: E402
from utils.gan.steps import fixed_inputs, generate  # noqa: E402
from utils.run.checkpoint import read_metrics  # noqa: E402

BAR_COLOURS = ["#777777", "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"]


def sample_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """Images in [-1, 1] as one grid in [0, 1]."""
    return make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)


def save_samples(images: torch.Tensor, path: str, nrow: int):
    save_image(sample_grid(images, nrow), path)


def save_generator_samples(G, path: str, device="cpu"):
    """samples.png of a generator: fixed inputs, one row per class."""
    z, labels = fixed_inputs(G)
    save_samples(generate(G, z, labels, device=device), path, nrow=len(z) // G.num_classes)


def save_side_by_side(grids: dict, path: str, title: str = None):
    """Several sample grids (name -> images tensor already arranged by `sample_grid`) in one figure."""
    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 4.6), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items()):
        ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    _save(fig, path)


def side_by_side_samples(generators: dict, path: str, title: str, device="cpu"):
    """Generators (name -> G) on the same fixed inputs, side by side."""
    grids = {}
    for name, G in generators.items():
        z, labels = fixed_inputs(G)
        grids[name] = sample_grid(generate(G.to(device), z, labels, device=device), nrow=len(z) // G.num_classes)
    save_side_by_side(grids, path, title)


def plot_curves(records: list, keys, path: str, title: str = "", ylabel: str = "loss", logx: bool = False):
    """Line plot of `keys` from metrics.jsonl records against the step (`logx`: a logarithmic step axis, points
    marked: a learning curve at doubling steps)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r and "step" in r]
        if points:
            ax.plot(*zip(*points), label=key, marker="o" if logx else None)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    _save(fig, path)


def plot_losses(run_dir: str, keys, title: str):
    """loss.png of a run, from its metrics.jsonl."""
    plot_curves(read_metrics(run_dir), keys, os.path.join(run_dir, "loss.png"), title)


def plot_epsilon(run_dir: str, title: str = "privacy spent"):
    """`epsilon.png`: total and this stage's epsilon against discriminator steps, from metrics.jsonl."""
    records = [{k: v for k, v in r.items() if v is not None} for r in read_metrics(run_dir)]  # None: infinite
    plot_curves(records, ["epsilon", "epsilon_stage"], os.path.join(run_dir, "epsilon.png"), title,
                ylabel="epsilon")


def save_training_figures(run_dir: str, G, title: str, device="cpu", private: bool = False):
    """The figures of a GAN training run: samples.png, loss.png and, for a DP run, epsilon.png."""
    save_generator_samples(G, os.path.join(run_dir, "samples.png"), device)
    plot_losses(run_dir, ["d_loss", "g_loss"], title)
    if private:
        plot_epsilon(run_dir, f"{title}: privacy spent")


def plot_cost_bars(rows: dict, path: str, title: str = "", reference: str = "teacher"):
    """One bar chart per cost, one bar per model, each labelled with its ratio to the reference."""
    keys = [key for key in COST_METRICS if all(key in row for row in rows.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.6), squeeze=False)
    names = list(rows)
    for ax, key in zip(axes[0], keys):
        bars = ax.bar(names, [rows[name][key] for name in names], color=BAR_COLOURS[:len(names)])
        for bar, name in zip(bars, names):
            ratio = (rows[name].get(f"vs_{reference}") or {}).get(key)
            if ratio is not None:
                ax.annotate(f"{ratio:.3g}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_title(COST_METRICS[key][0], fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.margins(y=0.15)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_tradeoff(rows: list, path: str):
    """Bytes on disk (log x) against downstream accuracy and FD, one labelled point per evaluated run (runs
    that land on the same point share one label)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, ylabel in ((axes[0], "downstream_accuracy", "downstream accuracy (higher is better)"),
                            (axes[1], "fd", "Frechet distance (lower is better)")):
        points = {}
        for row in rows:
            points.setdefault((row["bytes"], round(row[key], 6)), []).append(row["label"])
        for (x, y), labels in points.items():
            ax.scatter(x, y)
            ax.annotate(", ".join(labels), (x, y), textcoords="offset points", xytext=(5, 5))
        ax.set_xscale("log")
        ax.margins(x=0.25, y=0.1)
        ax.set_xlabel("bytes on disk (artifact, else state dict)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def _save(fig, path: str):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
