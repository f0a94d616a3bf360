"""A generator's seeded pool of class-balanced samples: what evaluate.py measures and generate.py releases, the
same images for the same seed and count (docs/DESIGN.md, "Releasing a synthetic dataset"). Its torch-free twin
for `generator.onnx` draws the same inputs with utils/gan/latents.py.
"""
import torch

from utils.run.cli import progress_bar
from utils.run.precision import FP32

POOL_BATCH = 500  # samples per forward pass (a float result can depend on the batch it was computed in)


@torch.no_grad()
def generated_pool(G, n: int, seed: int, device, desc: str, batch_size: int = POOL_BATCH, run=None,
                   precision=FP32) -> tuple:
    """n samples of G (eval mode, its forward passes in `precision`; or of `run`, e.g. its runtime artifact) with
    class-balanced labels; the same z and labels for every generator."""
    z, labels = G.sample_inputs(n, generator=torch.Generator().manual_seed(seed))
    G.eval()
    run = run or precision.wrap(G)
    images = [run(z[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)).cpu()
              for i in progress_bar(range(0, n, batch_size), desc=f"generate {desc}", leave=False)]
    return torch.cat(images), labels
