"""Shared fixtures: a tiny Fashion-MNIST-shaped IDX dataset on disk and tiny pipeline runs built on it."""
import gzip
import os
import struct
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)

TINY_TRAIN, TINY_TEST = 600, 200
TINY_PUBLIC = 200
TINY_G = ["16", "8", "4"]
TINY_D = ["8", "8"]


# The machine on which tests/test_precision.py and tests/test_fake_reuse.py recorded their "before" values. The CPU's
# vendor belongs to it: an AMD EPYC with the same torch and AVX-512 capability gave other weights after 7 DP steps
# (its random states equal), because the float kernels take other paths there.
RECORDED_ON = ("2.14.1", "x86_64", "AVX512", "GenuineIntel")


def cpu_vendor() -> str:
    """The CPU's vendor as the kernel reports it (GenuineIntel, AuthenticAMD, ...), or "" where it does not."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def skip_unless_recorded_on():
    """Skip a comparison with values recorded elsewhere: float kernels differ between torch builds and CPUs."""
    import platform
    here = (torch.__version__.split("+")[0], platform.machine(), torch.backends.cpu.get_cpu_capability(), cpu_vendor())
    if here != RECORDED_ON:
        pytest.skip(f"recorded on {RECORDED_ON}, this is {here}: float kernels may differ")


def state_hash(state: dict) -> str:
    """A short hash of a state dict's names and exact tensor bytes."""
    import hashlib
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def write_idx(path, array: np.ndarray, compress: bool):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if compress else open
    with opener(path + (".gz" if compress else ""), "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A class-dependent bar pattern plus noise, so that classes are learnable and distinguishable."""
    images = rng.integers(0, 40, size=(len(labels), 28, 28))
    for i, label in enumerate(labels):
        images[i, 2 * label + 2: 2 * label + 7, 4:24] = 220
    return images


def write_tiny_dataset(root: str, compress: bool = True):
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for prefix, count in (("train", TINY_TRAIN), ("t10k", TINY_TEST)):
        labels = np.arange(count) % 10
        rng.shuffle(labels)
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte"), make_images(labels, rng), compress)
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte"), labels, compress)
    return root


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    return write_tiny_dataset(str(tmp_path_factory.mktemp("tiny-fashion")))


def tiny_data_args(data_root):
    return ["--data-root", data_root, "--public-size", str(TINY_PUBLIC)]


@pytest.fixture
def no_figures(monkeypatch):
    """Skip drawing the matplotlib figures (loss curves, cost bars, side-by-side grids: 0.1-0.2 s each, closed
    unsaved) where a test is about numbers, not figures; samples.png grids are still written. Every figure is still
    drawn by its stage's own tests (test_teacher, test_student, test_compress, test_fine_tune, test_evaluate,
    test_make_resume)."""
    import matplotlib.pyplot as plt

    from utils.evaluation import plots
    monkeypatch.setattr(plots, "_save", lambda fig, path: plt.close(fig))


# The suite runs in float32 on every machine (a CPU with native bf16 would otherwise pick it: --precision auto);
# tests/test_precision.py runs bf16 where it tests it.
FP32 = ("--precision", "fp32")


def teacher_argv(data_root, out, *extra):
    return ["--out", out, *tiny_data_args(data_root), "--g-channels", *TINY_G, "--d-channels", *TINY_D,
            "--batch-size", "16", "--epochs", "1", "--max-steps", "3", "--device", "cpu", *FP32, *extra]


@pytest.fixture(scope="session")
def tiny_teacher_run(tiny_data_root, tmp_path_factory):
    """(out root, run dir) of a 3-step tiny teacher trained on the public split."""
    import train_teacher
    out = str(tmp_path_factory.mktemp("pipeline"))
    run_dir = train_teacher.main(train_teacher.parse_args(teacher_argv(tiny_data_root, out)))
    return out, run_dir


# ---------------------------------------------------------------- hand-made students (compression tests)

def handmade_student(channels=(12, 8, 6), bits=8, dead=((), (), ()), seed=0, hide_max_in_dead=True, image_size=28,
                     image_channels=1):
    """A Generator with random weights, calibrated BatchNorm statistics and random gamma/beta, whose channels
    `dead[i]` (indices into block i) are killed as the slimming stage does (alive False, gamma = beta = 0). With
    `hide_max_in_dead`, the largest weight of every output channel of the next layer sits in a dead input channel,
    so that recomputing weight scales (instead of keeping the stored ones) would change the function."""
    from models import Generator
    torch.manual_seed(seed)
    student = Generator(nz=16, num_classes=10, channels=channels, bits=bits, image_size=image_size,
                        image_channels=image_channels)
    with torch.no_grad():
        for block in student.blocks():
            block.conv.weight.normal_(0.0, 0.2)
            block.norm.momentum = None  # cumulative average over the calibration batches
        student.to_image.weight.normal_(0.0, 0.2)
        student.to_image.bias.normal_(0.0, 0.1)
        student.embed.weight.normal_(0.0, 1.0)
        student.train()
        for _ in range(3):
            student(*student.sample_inputs(64))
        for block, idx in zip(student.blocks(), dead):
            block.norm.weight.normal_(1.0, 0.3)
            block.norm.bias.normal_(0.2, 0.3)
            block.norm.momentum = 0.1
            block.norm.alive[list(idx)] = False
            block.norm.enforce_dead()
        if hide_max_in_dead:
            consumers = [block.conv.weight for block in student.blocks()[1:]] + [student.to_image.weight]
            in_dims = [0] * (len(consumers) - 1) + [1]
            for idx, weight, dim in zip(dead, consumers, in_dims):
                if len(idx):
                    big = 10 * weight.abs().max()
                    weight.index_fill_(dim, torch.tensor([idx[0]]), big)
        student.refresh_quant_scales()
    return student.eval()


def tiny_ledger() -> dict:
    from utils.privacy.ledger import new_ledger
    return new_ledger({"dataset": "fashion-mnist", "private_fingerprint": "f00d", "private_size": 400,
                       "public_size": 200, "partition_seed": 0})


def write_handmade_run(out, stage, generator, parent=None, teacher=None, discriminator=True, extra=None):
    """A checkpoint of `stage` holding `generator` (and a tiny discriminator), saved as the stage scripts do."""
    from models import Discriminator
    from utils.run.checkpoint import new_run_dir, unwrapped_state_dict
    from utils.run.lifecycle import Run
    run_dir = new_run_dir(str(out), stage, "x")
    checkpoint = {"stage": stage, "step": 7, "args": {"seed": 0}, "parent": parent, "privacy": tiny_ledger(),
                  "model_args": {"generator": generator.model_args()}, "generator": unwrapped_state_dict(generator)}
    if teacher is not None:
        checkpoint["teacher"] = teacher
    if discriminator:
        D = Discriminator(num_classes=generator.num_classes, channels=(8, 8))
        checkpoint["model_args"]["discriminator"] = D.model_args()
        checkpoint["discriminator"] = unwrapped_state_dict(D)
    checkpoint.update(extra or {})
    Run(run_dir, stage).save(checkpoint)
    return run_dir


@pytest.fixture
def handmade_pipeline(tmp_path):
    """(out, teacher run, distill run, student run), all hand-made (no training): a float teacher, a distill run
    whose parent is the teacher, and an 8-bit student with dead channels in every block."""
    from models import Generator
    out = tmp_path / "out"
    teacher = Generator(nz=16, num_classes=10, channels=(12, 8, 6), bits=32)
    teacher_run = write_handmade_run(out, "teacher", teacher, discriminator=True)
    distill_run = write_handmade_run(out, "distill", teacher, parent=teacher_run, discriminator=False)
    student = handmade_student(dead=([0, 3, 5], [1], [0, 1, 2, 3, 4]))
    student_run = write_handmade_run(out, "student", student, parent=distill_run, teacher=teacher_run)
    return str(out), teacher_run, distill_run, student_run


def distill_argv(out, *extra):
    return ["--out", out, "--num-samples", "200", "--batch-size", "64", "--device", "cpu", *FP32, *extra]


@pytest.fixture(scope="session")
def tiny_distill_run(tiny_teacher_run):
    """(out root, run dir) of a 200-sample distillation set of the tiny teacher, in the teacher's `out`."""
    import create_dataset
    out, teacher_dir = tiny_teacher_run
    argv = distill_argv(out, "--teacher-dir", teacher_dir)
    return out, create_dataset.main(create_dataset.parse_args(argv))


def student_argv(out, distill_dir, *extra):
    return ["--out", out, "--distill-dir", distill_dir, "--batch-size", "16", "--max-steps", "4",
            "--log-every", "1", "--checkpoint-every", "2", "--device", "cpu", *FP32, *extra]


@pytest.fixture(scope="session")
def tiny_student_run(tiny_distill_run):
    """(out root, run dir) of a 4-step tiny 8-bit student whose large rho killed some channels (active channels
    [9, 5, 3] of [16, 8, 4]: at least one live channel per layer)."""
    import train_student
    out, distill_dir = tiny_distill_run
    argv = student_argv(out, distill_dir, "--rho", "2.5")
    return out, train_student.main(train_student.parse_args(argv))


def check_sample_grid(path, tiles: int, nrow: int = 10) -> np.ndarray:
    """A sample grid PNG (utils/evaluation/plots.save_samples: 28x28 tiles, 2-pixel white padding) holds `tiles` tiles
    in rows of `nrow` (the white padding lines sit where that layout puts them), the image is not constant and not
    every tile is the same image; returns the tiles as a (tiles, 28, 28) array. (A barely trained generator's
    tiles may each be nearly flat grey once saved as 8 bits, so single tiles are not required to vary.)"""
    from PIL import Image
    grid = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    rows, step = -(-tiles // nrow), 28 + 2
    assert grid.shape == (rows * step + 2, nrow * step + 2), grid.shape
    padding = np.ones_like(grid, dtype=bool)
    for r in range(rows):
        for c in range(nrow):
            padding[2 + step * r: step * (r + 1), 2 + step * c: step * (c + 1)] = False
    assert (grid[padding] == 255).all(), "the tiles are not laid out as expected"
    cells = np.stack([grid[2 + step * r: step * (r + 1), 2 + step * c: step * (c + 1)]
                      for r in range(rows) for c in range(nrow)][:tiles])
    assert cells.std() > 0 and (cells != 255).any(), "a blank or constant grid"
    assert np.abs(cells - cells[0]).max() > 0, "every tile is the same image"
    return cells


# ---------------------------------------------------------------- Poisson batches against the ledger's q

STANDARD_ERRORS = 5.0  # a realised statistic this far from its expectation fails (flaky about once in 10^6 runs)


def check_poisson_batch_sizes(sizes, n: int, q: float):
    """`sizes` (many draws) are Binomial(n, q): their mean within 5 standard errors of q*n and their standard
    deviation within 5 standard errors of sqrt(n q (1 - q)). The standard error of the sample standard deviation
    s over T draws is about sigma/2 * sqrt((2 + kurtosis excess) / T), the binomial's excess being
    (1 - 6 q (1 - q)) / (n q (1 - q)). A batch drawn at twice the rate fails by tens of standard errors."""
    sizes = torch.as_tensor(sizes, dtype=torch.float64)
    draws, variance = len(sizes), n * q * (1 - q)
    sigma, excess = variance ** 0.5, (1 - 6 * q * (1 - q)) / variance
    mean_error = (variance / draws) ** 0.5
    std_error = sigma / 2 * ((2 + excess) / draws) ** 0.5
    mean, std = sizes.mean().item(), sizes.std().item()
    assert abs(mean - q * n) <= STANDARD_ERRORS * mean_error, \
        f"mean batch {mean:.3f} over {draws} draws, expected q*N = {q * n:.3f} (standard error {mean_error:.4f})"
    assert abs(std - sigma) <= STANDARD_ERRORS * std_error, \
        f"batch size std {std:.3f} over {draws} draws, expected sqrt(N q (1-q)) = {sigma:.3f} " \
        f"(standard error {std_error:.4f})"


def check_inclusion_counts(counts, draws: int, q: float):
    """Each of the n records was in `counts[i]` of `draws` Poisson batches: Binomial(draws, q) each, so none
    further than 5.5 standard errors from q*draws (about 1.5e-5 chance over 400 records): a sampler that skips
    part of the split, or favours part of it, fails."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    error = (draws * q * (1 - q)) ** 0.5
    worst = (counts - q * draws).abs().max().item()
    assert worst <= 5.5 * error, f"a record's inclusion count is {worst / error:.1f} standard errors from q*T"
