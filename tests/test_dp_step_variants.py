"""The DP step's variants of issue 25, item 1 (utils/privacy/pair_gradients.py: `--grad-sample-mode fused`, the
default, and `vmap`; benchmarks/bench_dp_step.py): the guarantee of Opacus's modes.

In every mode the applied update of one DP step is each (real i, fake i) pair's gradient clipped to C, summed,
divided by B, plus noise of std sigma*C/B (the pattern of tests/test_dp_noise.py, whose exact-clipping test and
tests/test_fake_reuse.py's reused-fakes test cover the new modes too). Here the clipping norm is the median pair
norm, so half of the pairs are clipped and half are not (with every pair clipped, a gradient wrongly scaled by a
constant would still pass), over three Poisson-sized batches of 4, 7 and 3 pairs (the fused mode's buffers grow,
then serve a smaller batch). The per-pair gradients themselves match autograd one pair at a time on layers the
discriminator does not have (dilated, unpadded and bias-free convs, Linear layers) and in channels-last memory.
"""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fine_tune
import train_teacher
from conftest import ROOT, teacher_argv
from models import Discriminator
from test_dp_noise import BATCH, CLIP, build_trainer, fixed_batch
from test_fine_tune import ft_argv
from utils.gan.steps import d_loss
from utils.privacy import dp
from utils.privacy.pair_gradients import PAIR_GRADIENT_MODES, check_fusable, pair_gradients
from utils.run.cli import UserError

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_dp_step  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # Opacus's hooks, off for references
BATCH_SIZES = (4, 7, 3)  # Poisson batches around the expected B = 4: larger (buffers grow), then smaller


def pair_grads_by_hand(D, real, labels, fake, fake_labels) -> torch.Tensor:
    """(n, parameters): each pair's gradient of softplus(-D(real i)) + softplus(D(fake i)), one pair at a time."""
    params = [p for p in D.parameters() if p.requires_grad]
    rows = []
    for i in range(len(real)):
        loss = (F.softplus(-D(real[i:i + 1], labels[i:i + 1])) + F.softplus(D(fake[i:i + 1], fake_labels[i:i + 1])))
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss.sum(), params)]))
    return torch.stack(rows)


def flat_parameters(D) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in D.parameters()])


def batch_of(split, G, n: int, seed: int) -> tuple:
    real, labels = split.batch(torch.arange(seed, seed + n))
    z, fake_labels = G.sample_inputs(n, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        fake = G(z, fake_labels)
    return real, labels, fake, fake_labels


def set_clipping_norm(pd, clip: float):
    """C of the next steps (sigma = 0: the noise does not depend on it); ghost clips in its module."""
    pd.optimizer.max_grad_norm = clip
    if pd.grad_sample_mode == "ghost":
        pd.module.max_grad_norm = clip


@pytest.mark.parametrize("mode", dp.GRAD_SAMPLE_MODES)
def test_every_mode_clips_each_pair_at_the_median_norm_exactly_over_batches_of_other_sizes(tiny_data_root, mode):
    """sigma = 0, C = the median pair norm of each batch: the applied update is the hand-clipped sum / B."""
    trainer, G, D, split = build_trainer(tiny_data_root, 0.0, grad_sample_mode=mode)
    for step, n in enumerate(BATCH_SIZES):
        batch = batch_of(split, G, n, seed=10 * step)
        with dp.hooks_off(trainer.pd.module):  # Opacus's hooks on D's layers would record the reference's passes
            grads = pair_grads_by_hand(D, *batch)
        norms = grads.norm(dim=1)
        clip = norms.median().item()
        set_clipping_norm(trainer.pd, clip)
        expected = (grads * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(dim=0) / BATCH
        before = flat_parameters(D)
        dp.discriminator_backward(trainer.pd, *batch)
        trainer.pd.optimizer.step()
        torch.testing.assert_close(before - flat_parameters(D), expected, rtol=1e-4, atol=1e-8)
        assert 0 < int((norms > clip * (1 + 1e-5)).sum()) < n  # some pairs clipped, some not
    assert trainer.pd.history == [(0.0, BATCH / len(split), len(BATCH_SIZES))]


@pytest.mark.parametrize("mode", dp.GRAD_SAMPLE_MODES)
def test_every_mode_adds_noise_of_std_sigma_c_over_b_from_the_runs_generator(tiny_data_root, mode):
    """The applied update minus the clipped mean has std sigma*C/B (C small: every pair clipped), drawn from the
    run's noise generator: the same draw as in every other mode."""
    sigma = 0.8
    trainer, G, D, split = build_trainer(tiny_data_root, sigma, grad_sample_mode=mode)
    batch = fixed_batch(G, split)
    with dp.hooks_off(trainer.pd.module):
        grads = pair_grads_by_hand(D, *batch)
    clipped_mean = (grads * (CLIP / (grads.norm(dim=1) + 1e-6)).clamp(max=1.0)[:, None]).sum(dim=0) / BATCH
    before = flat_parameters(D)
    dp.discriminator_backward(trainer.pd, *batch)
    trainer.pd.optimizer.step()
    noise = before - flat_parameters(D) - clipped_mean
    assert noise.std().item() == pytest.approx(sigma * CLIP / BATCH, rel=0.1)
    assert abs(noise.mean().item()) < 4 * sigma * CLIP / BATCH / noise.numel() ** 0.5
    reference = torch.Generator().manual_seed(0 + dp.NOISE_SEED_OFFSET)  # the seed build_trainer's run uses
    drawn = torch.cat([torch.normal(0, sigma * CLIP, p.shape, generator=reference).flatten() for p in D.parameters()])
    torch.testing.assert_close(noise, drawn / BATCH, rtol=0, atol=1e-6)


class OddLayers(nn.Module):
    """A (images, labels) -> logit network with what Discriminator lacks: a dilated bias-free conv, an unpadded
    one, Linear layers (one on a sequence: extra dimensions), all in one submodule."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(11, 4, 3, stride=1, padding=2, dilation=2, bias=False), nn.LeakyReLU(0.2),
            nn.Conv2d(4, 6, 4, stride=3, padding=0), nn.LeakyReLU(0.2), nn.Flatten(2), nn.Linear(81, 3),
            nn.LeakyReLU(0.2), nn.Flatten(1), nn.Linear(18, 1))

    def forward(self, images, labels):
        planes = F.one_hot(labels, 10).to(images.dtype)[:, :, None, None].expand(-1, -1, 28, 28)
        return self.net(torch.cat([images, planes], dim=1)).flatten()


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("network", ["discriminator", "wider", "odd-layers"])
@pytest.mark.parametrize("mode", PAIR_GRADIENT_MODES)
def test_pair_gradients_match_autograd_pair_by_pair(mode, network, channels_last):
    """"wider": the layout of the non-private teacher's default discriminator (one more strided 3x3 conv), which the
    student and DP fine-tuning inherit."""
    torch.manual_seed(0)
    D = {"discriminator": lambda: Discriminator(channels=(8, 8)), "wider": lambda: Discriminator(channels=(8, 8, 8)),
         "odd-layers": OddLayers}[network]()
    if channels_last:
        D = D.to(memory_format=torch.channels_last)
    real, fake = torch.randn(5, 1, 28, 28), torch.randn(5, 1, 28, 28)
    labels, fake_labels = torch.randint(0, 10, (5,)), torch.randint(0, 10, (5,))
    compute = pair_gradients(mode, D)
    for n in (5, 2):  # the second call reuses (a slice of) the first one's buffers
        loss, grads = compute(D, real[:n], labels[:n], fake[:n], fake_labels[:n])
        got = torch.stack([torch.cat([grads[p][i].flatten() for p in D.parameters()]) for i in range(n)])
        torch.testing.assert_close(got, pair_grads_by_hand(D, real[:n], labels[:n], fake[:n], fake_labels[:n]),
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(loss, d_loss(D(real[:n], labels[:n]), D(fake[:n], fake_labels[:n])))


def test_unsupported_layers_are_refused_in_one_line():
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(UserError, match="groups 1"):
        check_fusable(grouped)
    with pytest.raises(UserError, match="Embedding"):
        check_fusable(nn.Sequential(nn.Embedding(10, 4)))
    with pytest.raises(UserError, match="one submodule"):
        pair_gradients("vmap", nn.Linear(3, 1))


def test_both_dp_scripts_select_the_mode_and_fused_is_the_default(tiny_data_root, tmp_path):
    assert dp.DEFAULT_GRAD_SAMPLE_MODE == "fused" and set(PAIR_GRADIENT_MODES) <= set(dp.GRAD_SAMPLE_MODES)
    teacher = train_teacher.parse_args(teacher_argv(tiny_data_root, str(tmp_path), "--dp", "--split", "private",
                                                    "--grad-sample-mode", "vmap"))
    private = fine_tune.parse_args(ft_argv(tiny_data_root, tmp_path, "--grad-sample-mode", "hooks"))
    assert dp.DPConfig.from_args(teacher).grad_sample_mode == "vmap"
    assert dp.DPConfig.from_args(private).grad_sample_mode == "hooks"
    assert dp.DPConfig.from_args(fine_tune.parse_args(ft_argv(tiny_data_root, tmp_path))).grad_sample_mode == "fused"


def test_the_benchmark_checks_every_variant_and_its_check_can_fail(tmp_path):
    """bench_dp_step.py on tiny models: every variant of the table (mode and options) clips exactly and is timed;
    Opacus's hooks on a channels-last discriminator do not (opacus 1.6.0): the check is no formality."""
    variants = ["hooks", "fused", "vmap", "fused+reuse/2", "fused+physical/3", "fused+channels-last", "fused+d=4/8",
                "hooks+physical/3", "hooks+channels-last"]
    args = bench_dp_step.parse_args(["--batch-sizes", "6", "--private-size", "100", "--g-channels", "12", "8", "4",
                                     "--d-channels", "8", "8", "--repeats", "1", "--warmup", "0", "--results-dir",
                                     str(tmp_path), "--variants", *variants])
    bench_dp_step.main(args)
    (result,) = [json.loads(path.read_text()) for path in tmp_path.glob("dp_step-*.json")]
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == variants and all("dp_ms" in row for row in rows.values())
    assert all(rows[name]["exact"] for name in variants[:-1]), {n: r.get("errors") for n, r in rows.items()}
    assert not rows["hooks+channels-last"]["exact"]
    assert rows["fused+d=4/8"]["d_params"] < rows["fused"]["d_params"]
    assert len(list(tmp_path.glob("dp_step-*.md"))) == 1
