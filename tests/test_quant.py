"""Fake quantisation (models/quant.py): values on a grid of at most 2^bits levels, straight-through gradients,
32 bits = identity, stored scales in eval mode."""
import pytest
import torch
import torch.nn.functional as F

from models import Generator, QuantConv2d, QuantConvTranspose2d, quantize_activation, quantize_weight
from models.quant import ACT_RANGE, weight_qmax, weight_scale


def on_integer_grid(values: torch.Tensor) -> bool:
    return torch.allclose(values, values.round(), atol=1e-4)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("out_dim", [0, 1])  # Conv2d and ConvTranspose2d layouts
def test_weights_per_channel_grid(bits, out_dim):
    weight = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(bits))
    scale = weight_scale(weight, bits, out_dim)
    quantized = quantize_weight(weight, scale, bits, out_dim)
    for channel in range(weight.shape[out_dim]):
        levels = quantized.select(out_dim, channel) / scale[channel]
        assert on_integer_grid(levels)
        assert levels.round().abs().max() <= weight_qmax(bits)
        assert len(levels.round().unique()) <= 2 ** bits
        # the largest weight sits exactly on the grid's end; everything is within half a step
        error = (quantized.select(out_dim, channel) - weight.select(out_dim, channel)).abs().max()
        assert error <= scale[channel] / 2 + 1e-6


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activations_grid(bits):
    x = torch.linspace(-1, ACT_RANGE + 1, 5000)
    quantized = quantize_activation(x, bits)
    step = ACT_RANGE / (2 ** bits - 1)
    assert quantized.min() == 0 and quantized.max() == pytest.approx(ACT_RANGE)
    assert on_integer_grid(quantized / step)
    assert len(quantized.unique()) <= 2 ** bits
    inside = (x >= 0) & (x <= ACT_RANGE)
    assert ((quantized - x)[inside].abs() <= step / 2 + 1e-6).all()


def test_straight_through_gradients():
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    quantize_weight(weight, weight_scale(weight, 4, 0), 4, 0).sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))

    x = torch.tensor([-0.5, 0.3, 1.7, 3.9, 4.5], requires_grad=True)
    quantize_activation(x, 4).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # identity inside the clamp range, 0 outside


def test_32_bits_is_identity():
    weight, x = torch.randn(4, 3, 3, 3), torch.randn(2, 3, 8, 8)
    assert quantize_weight(weight, torch.ones(4), 32, 0) is weight
    assert quantize_activation(x, 32) is x
    conv = QuantConv2d(3, 4, 3, padding=1, bits=32)
    assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


def test_layers_use_stored_scale_in_eval_and_refresh_in_training():
    conv = QuantConvTranspose2d(3, 4, 4, 2, 1, bits=8)
    with torch.no_grad():
        conv.weight.mul_(3)  # stale stored scale
    stale = conv.weight_scale.clone()
    conv.eval()
    conv(torch.randn(1, 3, 5, 5))
    assert torch.equal(conv.weight_scale, stale)
    conv.train()
    conv(torch.randn(1, 3, 5, 5))
    assert torch.allclose(conv.weight_scale, stale * 3)


def test_two_training_forwards_before_one_backward():
    """Refreshing the scale buffer on a second forward must not break the first forward's backward."""
    G = Generator(channels=(8, 4, 4), bits=8)
    z, labels = G.sample_inputs(4)
    (G(z, labels).sum() + G(z, labels).sum()).backward()
    assert all(p.grad is not None for p in G.parameters())


def test_generator_weights_and_activations_on_grid():
    bits = 4
    G = Generator(channels=(8, 4, 4), bits=bits).eval()
    for module in G.modules():
        if isinstance(module, (QuantConv2d, QuantConvTranspose2d)):
            levels = module.quantized_weight() / module.weight_scale.view(
                [-1 if d == module.out_dim else 1 for d in range(4)])
            assert on_integer_grid(levels) and levels.round().abs().max() <= weight_qmax(bits)
    outputs = []
    G.block1.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    G(*G.sample_inputs(10))
    assert len(outputs[0].unique()) <= 2 ** bits
    assert on_integer_grid(outputs[0] / (ACT_RANGE / (2 ** bits - 1)))
