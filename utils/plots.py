"""PNG figures: sample grids, loss curves, active channels over training."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402


def sample_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """Images in [-1, 1] as one grid in [0, 1]."""
    return make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)


def save_samples(images: torch.Tensor, path: str, nrow: int):
    save_image(sample_grid(images, nrow), path)


def save_side_by_side(grids: dict, path: str, title: str = None):
    """Several sample grids (name -> images tensor already arranged by `sample_grid`) in one figure."""
    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 4.6), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items()):
        ax.imshow(grid.permute(1, 2, 0).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(records: list, keys, path: str, title: str = "", ylabel: str = "loss", x: str = "step"):
    """Line plot of `keys` from metrics.jsonl records against `x`."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(r[x], r[key]) for r in records if key in r and x in r]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
