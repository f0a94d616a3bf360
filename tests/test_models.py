import pytest
import torch
from opacus.validators import ModuleValidator

import models
from models import Discriminator, Generator


@pytest.mark.parametrize("channels", [(256, 128, 64), (16, 8, 4), (1, 1, 1), (5, 3, 7)])
@pytest.mark.parametrize("bits", [32, 8, 4])
def test_generator_shape_and_range(channels, bits):
    G = Generator(channels=channels, bits=bits)
    z, labels = G.sample_inputs(6)
    for mode in (G.train, G.eval):
        mode()
        images = G(z, labels)
        assert images.shape == (6, 1, 28, 28)
        assert images.min() >= -1 and images.max() <= 1


def test_labels_change_the_output():
    torch.manual_seed(0)
    G = Generator(channels=(16, 8, 4)).eval()
    z = torch.randn(1, G.nz).repeat(10, 1)
    images = G(z, torch.arange(10))
    assert all((images[i] - images[0]).abs().max() > 1e-4 for i in range(1, 10))


def test_generator_rebuilds_from_model_args():
    G = Generator(channels=(12, 6, 3), bits=4)
    clone = Generator(**G.model_args())
    clone.load_state_dict(G.state_dict())
    z, labels = G.sample_inputs(3)
    assert torch.equal(G.eval()(z, labels), clone.eval()(z, labels))


@pytest.mark.parametrize("channels", [(64, 128), (8, 8)])
def test_discriminator_shape_and_opacus_compatibility(channels):
    D = Discriminator(channels=channels)
    logits = D(torch.rand(5, 1, 28, 28) * 2 - 1, torch.arange(5))
    assert logits.shape == (5,)
    assert ModuleValidator.validate(D, strict=False) == []
    assert not any(getattr(m, "inplace", False) for m in D.modules())


def test_discriminator_uses_labels():
    torch.manual_seed(0)
    D = Discriminator(channels=(8, 8))
    image = torch.rand(1, 1, 28, 28).repeat(2, 1, 1, 1)
    logits = D(image, torch.tensor([0, 1]))
    assert logits[0] != logits[1]


def test_quant_bits_constant():
    assert models.QUANT_BITS == 8


def test_frozen_norm_stats_make_training_mode_equal_eval_mode():
    torch.manual_seed(0)
    G = Generator(channels=(8, 6, 4), bits=8)
    for block in G.blocks():
        block.norm.running_mean.normal_()
        block.norm.running_var.uniform_(0.5, 2)
    z, labels = G.sample_inputs(5)
    expected = G.eval()(z, labels)
    G.frozen_norm_stats = True
    G.train()
    assert all(not block.norm.training for block in G.blocks()) and G.block0.conv.training
    running_mean = G.block1.norm.running_mean.clone()
    assert torch.allclose(G(z, labels), expected, atol=1e-6)
    assert torch.equal(G.block1.norm.running_mean, running_mean)
