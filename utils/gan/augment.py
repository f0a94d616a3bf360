"""DiffAugment (Zhao et al. 2020): differentiable augmentations applied to every image the discriminator sees,
real and fake alike, so that D cannot tell them apart by the augmentation and G still gets gradients through it.
It lets a GAN train on a small split (here the public 10k) without D memorising it.

Policies: `translation` (shift by up to 1/8 of the size, integer pixels, per image) and `cutout` (a square of half
the size at a random place, per image). Uncovered or cut pixels take the background value `fill`, -1 in this
project's [-1, 1] range (Fashion-MNIST's black): the original fills with 0, which here would be mid-grey, a
pattern no real image has. The randomness comes from a caller's `torch.Generator`, so a resumed run draws the same
augmentations. Every operation is per sample, so it is compatible with DP-SGD's per-sample clipping.
"""
import torch
import torch.nn.functional as F

POLICIES = ("translation", "cutout")
BACKGROUND = -1.0


def translation(x: torch.Tensor, rng: torch.Generator, ratio: float = 0.125, fill: float = BACKGROUND):
    """Shift each image by up to ratio * size pixels in each direction (integer shifts, background fill)."""
    n, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (n, 1, 1), generator=rng).to(x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (n, 1, 1), generator=rng).to(x.device)
    batch, rows, cols = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(h, device=x.device),
                                       torch.arange(w, device=x.device), indexing="ij")
    rows = torch.clamp(rows + dy + 1, 0, h + 1)  # +1: index into the image padded by one background pixel
    cols = torch.clamp(cols + dx + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1], value=fill)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def cutout_mask(shape, rng: torch.Generator, ratio: float = 0.5, device="cpu") -> torch.Tensor:
    """(N, 1, H, W) mask, 0 inside one random square of ratio * size per image (clipped at the border), else 1."""
    n, _, h, w = shape
    size_y, size_x = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - size_y % 2), (n, 1, 1), generator=rng)
    cx = torch.randint(0, w + (1 - size_x % 2), (n, 1, 1), generator=rng)
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    inside_y = (rows >= cy - size_y // 2) & (rows < cy - size_y // 2 + size_y)
    inside_x = (cols >= cx - size_x // 2) & (cols < cx - size_x // 2 + size_x)
    return (~(inside_y & inside_x)).float()[:, None].to(device)


def cutout(x: torch.Tensor, rng: torch.Generator, ratio: float = 0.5, fill: float = BACKGROUND) -> torch.Tensor:
    mask = cutout_mask(x.shape, rng, ratio, x.device).to(x.dtype)
    return x * mask + fill * (1.0 - mask)


OPERATIONS = {"translation": translation, "cutout": cutout}


def parse_policy(text: str) -> tuple:
    """'translation,cutout' -> ('translation', 'cutout'); '' or 'none' -> (); unknown names raise ValueError."""
    names = tuple(name.strip() for name in text.split(",") if name.strip() and name.strip() != "none")
    unknown = [name for name in names if name not in OPERATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation {', '.join(unknown)}: choose from {', '.join(POLICIES)}")
    return names


def diff_augment(x: torch.Tensor, policy, rng: torch.Generator) -> torch.Tensor:
    """Apply the policy's operations in order (an empty policy returns x itself)."""
    for name in policy:
        x = OPERATIONS[name](x, rng)
    return x
