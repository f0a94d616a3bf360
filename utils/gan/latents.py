"""The generator's seeded inputs, drawn with numpy alone: what `Generator.sample_inputs(n,
generator=torch.Generator().manual_seed(seed))` draws, for a process without torch (generate.py's ONNX path,
docs/DESIGN.md, "Releasing a synthetic dataset").

torch's CPU `randn` (float32, 16 values or more, contiguous) fills the tensor with uniforms from its Mersenne
Twister (the low 24 bits of each 32-bit output times 2^-24), then turns each block of 16 into normals by Box-Muller
(u1 = 1 - value j, u2 = value j + 8: radius sqrt(-2 log u1), angle 2 pi u2, cosine into j, sine into j + 8); when
the count is not a multiple of 16, 16 fresh uniforms make the last 16 values again. torch seeds the twister as
numpy's legacy `RandomState(seed)` does (Matsumoto and Nishimura's init_genrand), so the uniforms are equal bit
for bit; the normals agree to float rounding (about 1e-6: torch's vectorised log, sin and cos are not numpy's).
tests/test_generate.py holds the two against each other.
"""
import numpy as np

BLOCK = 16  # torch's normal_fill transforms 16 uniforms at a time
UNIFORM_BITS = 24  # float32's mantissa: torch keeps the low 24 bits of a 32-bit output


def twister_words(seed: int, count: int) -> np.ndarray:
    """The first `count` 32-bit outputs of the Mersenne Twister that `torch.Generator().manual_seed(seed)` holds
    (torch keeps the low 32 bits of the seed)."""
    state = np.random.RandomState(seed & 0xFFFFFFFF)
    # the full 32-bit range is the raw output, one word per value (no rejection)
    return state.randint(0, 2**32, size=count, dtype=np.uint32)


def box_muller(uniforms: np.ndarray) -> np.ndarray:
    """torch's normal_fill_16 on rows of 16 uniforms: 8 cosines, then 8 sines."""
    u1, u2 = 1.0 - uniforms[:, :BLOCK // 2].astype(np.float64), uniforms[:, BLOCK // 2:].astype(np.float64)
    radius, angle = np.sqrt(-2.0 * np.log(u1)), 2.0 * np.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)], axis=1).astype(np.float32)


def torch_randn(shape: tuple, seed: int) -> np.ndarray:
    """float32 `torch.randn(*shape, generator=torch.Generator().manual_seed(seed))`, to float rounding."""
    count = int(np.prod(shape))
    if count < BLOCK:  # torch draws fewer values another way (scalar Box-Muller on 64-bit draws)
        raise ValueError(f"torch_randn needs at least {BLOCK} values, got {count}")
    tail = count % BLOCK
    words = twister_words(seed, count + (BLOCK if tail else 0))
    uniforms = (words & (2**UNIFORM_BITS - 1)).astype(np.float32) * np.float32(2.0 ** -UNIFORM_BITS)
    whole = count - tail
    values = np.empty(count, np.float32)
    values[:whole] = box_muller(uniforms[:whole].reshape(-1, BLOCK)).ravel()
    if tail:  # torch makes the last 16 values again from 16 fresh uniforms
        values[-BLOCK:] = box_muller(uniforms[count:].reshape(1, BLOCK)).ravel()
    return values.reshape(shape)


def sample_inputs(n: int, nz: int, num_classes: int, seed: int) -> tuple:
    """(z float32 (n, nz), labels int64 (n,)): `Generator.sample_inputs` with a generator seeded by `seed`, i.e.
    the latent vectors evaluate.py and generate.py draw, and class-balanced labels 0, 1, ..., C-1, 0, ..."""
    return torch_randn((n, nz), seed), np.arange(n, dtype=np.int64) % num_classes
