"""Which canaries does a non-private GAN discriminator remember? The probe that chose the audit's canary kind.

A stripped-down, non-private version of an audit run (issue 13, docs/DESIGN.md, "Privacy"): from a compact
checkpoint's generator and discriminator, plain Adam (no clipping, no noise) trains D on a seeded subset of the
private split plus the included half of m canaries (Poisson batches, fresh fakes each step) and, unless
--freeze-generator, G every fifth step; then the AUC of members against non-members of D's logit on each canary,
raw and relative to the starting D. AUC 0.5: the canaries leave no trace an audit could find.

Canary kinds: mislabelled (test images, wrong label), noise (uniform pixels), inverted (255 - test image), dots
(30 white pixels on black), stamp (test image with an 8x8 noise block), fake (samples of the starting generator in
eval mode, labelled with their class), faketrain (the same in training mode, in batches of 32: exactly as D sees
fakes; what `utils.privacy.audit.generated_canaries` does), fakewrong (fake with a wrong label).
Results of every run made: benchmarks/results/audit_canaries.md.

example:
  OMP_NUM_THREADS=1 python benchmarks/probes/audit_canary_probe.py --kind faketrain --subset 100 --steps 1200 \\
      --lr-d 1e-3 --freeze-generator --compact runs/compact/latest
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from utils.data.datasets import load_split, seeded_subset, to_unit_range  # noqa: E402
from utils.gan.steps import d_loss, g_loss, random_inputs  # noqa: E402
from utils.privacy.audit import rank_auc  # noqa: E402
from utils.run.checkpoint import build_discriminator, build_generator, load_checkpoint  # noqa: E402

KINDS = ("mislabelled", "noise", "inverted", "dots", "stamp", "fake", "faketrain", "fakewrong", "truelabel")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=KINDS, default="faketrain")
    parser.add_argument("--subset", type=int, default=1000, help="private images besides the canaries")
    parser.add_argument("--steps", type=int, default=600, help="D steps")
    parser.add_argument("--lr-d", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=32, help="expected Poisson batch")
    parser.add_argument("--canaries", type=int, default=500)
    parser.add_argument("--freeze-generator", action="store_true", help="never update G")
    parser.add_argument("--compact", default="checkpoints/compact/latest", help="compact run to start from")
    parser.add_argument("--data-root", default="data")
    return parser.parse_args(argv)


def make_probe_canaries(kind: str, G, test, m: int, rng: torch.Generator) -> tuple:
    """(uint8 images, labels) of m canaries of `kind`, drawn from `rng` in a fixed order."""
    chosen = torch.randperm(len(test), generator=rng)[:m]
    images, true = test.images[chosen].clone(), test.labels[chosen]
    labels = (true + torch.randint(1, 10, (m,), generator=rng)) % 10
    if kind == "noise":
        images = torch.randint(0, 256, images.shape, generator=rng, dtype=torch.uint8)
    elif kind == "inverted":
        images = 255 - images
    elif kind == "dots":
        images = torch.zeros_like(images)
        for i in range(m):
            images[i].view(-1)[torch.randperm(images[i].numel(), generator=rng)[:30]] = 255
    elif kind == "stamp":
        for i in range(m):
            row, col = torch.randint(0, 20, (2,), generator=rng)
            images[i, row:row + 8, col:col + 8] = torch.randint(0, 256, (8, 8), generator=rng, dtype=torch.uint8)
    elif kind.startswith("fake"):
        z, drawn = random_inputs(G, m, rng, "cpu")
        with torch.no_grad():
            if kind == "faketrain":
                fakes = torch.cat([G(z[i:i + 32], drawn[i:i + 32]) for i in range(0, m, 32)])
            else:
                G.eval()
                fakes = G(z, drawn)
                G.train()
        images = ((fakes.squeeze(1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        labels = drawn if kind in ("fake", "faketrain") else (drawn + torch.randint(1, 10, (m,), generator=rng)) % 10
    elif kind == "truelabel":
        labels = true
    return images, labels


def train(G, D, images, labels, args):
    """Non-private GAN training on (images, labels): Poisson batches, D every step, G every fifth."""
    d_opt = torch.optim.Adam(D.parameters(), lr=args.lr_d, betas=(0.5, 0.999))
    g_opt = torch.optim.Adam(G.parameters(), lr=1e-4, betas=(0.5, 0.999))
    rng, q = torch.Generator().manual_seed(2), args.batch_size / len(images)
    for step in range(args.steps):
        chosen = torch.nonzero(torch.rand(len(images), generator=rng) < q).flatten()
        z, fake_labels = random_inputs(G, args.batch_size, rng, "cpu")
        with torch.no_grad():
            fake = G(z, fake_labels)
        d_opt.zero_grad()
        d_loss(D(to_unit_range(images[chosen]), labels[chosen]), D(fake, fake_labels)).backward()
        d_opt.step()
        if step % 5 == 4 and not args.freeze_generator:
            z, fake_labels = random_inputs(G, args.batch_size, rng, "cpu")
            g_opt.zero_grad()
            g_loss(D(G(z, fake_labels), fake_labels)).backward()
            g_opt.step()
    return q


def main(args):
    torch.set_num_threads(1)
    checkpoint = load_checkpoint(args.compact)
    G, D, start_D = build_generator(checkpoint), build_discriminator(checkpoint), build_discriminator(checkpoint)
    private = seeded_subset(load_split("fashion-mnist", "private", args.data_root), args.subset, 0)
    test = load_split("fashion-mnist", "test", args.data_root)
    rng = torch.Generator().manual_seed(1)
    images, labels = make_probe_canaries(args.kind, G, test, args.canaries, rng)
    included = torch.rand(args.canaries, generator=rng) < 0.5
    started = time.time()
    q = train(G, D, torch.cat([private.images, images[included]]), torch.cat([private.labels, labels[included]]),
              args)
    with torch.no_grad():
        D.eval(), start_D.eval()
        x = to_unit_range(images)
        final, start = D(x, labels).numpy(), start_D(x, labels).numpy()
    change, i = final - start, included.numpy()
    print(f"{args.kind} freeze={args.freeze_generator} N={args.subset} steps={args.steps} lr={args.lr_d} "
          f"B={args.batch_size} passes={args.steps * q:.0f}  start logit {start.mean():.2f}  AUC change "
          f"{rank_auc(change[i], change[~i]):.3f} raw {rank_auc(final[i], final[~i]):.3f}  mean change in/out "
          f"{change[i].mean():.2f}/{change[~i].mean():.2f}  {time.time() - started:.0f}s", flush=True)


if __name__ == "__main__":
    main(parse_args())
