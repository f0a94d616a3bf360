"""Generators and discriminators for 28, 32 and 64 pixels and 1 or 3 channels: shapes, rebuilding, GAN Slimming's
prunable layers, exact compression, and Opacus compatibility; the 28x28 grey layout is the original one."""
import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator

from conftest import handmade_student
from models import Discriminator, Generator, prunable_layers
from utils.compression.compress import compress, kept_channels, max_abs_difference, summary
from utils.compression.deploy import generator_from_artifact, artifact_dict
from utils.compression.slimming import gamma_parameters

SHAPES = [(28, 1), (28, 3), (32, 1), (32, 3), (64, 1), (64, 3)]
TINY_G = {28: (8, 6, 4), 32: (8, 6, 5, 4), 64: (8, 7, 6, 5, 4)}
TINY_D = {28: (4, 6), 32: (4, 5, 6), 64: (3, 4, 5, 6)}



def original_28_generator_layout() -> list:
    """(name, shape) of every entry of the original 28x28 grey generator's state dict, in order: checkpoints
    written before other sizes existed depend on it."""
    layout = [("embed.weight", (10, 10))]
    for i, (width_in, width, kernel) in enumerate([(110, 256, 7), (256, 128, 4), (128, 64, 4)]):
        layout += [(f"block{i}.conv.weight", (width_in, width, kernel, kernel)),
                   (f"block{i}.conv.weight_scale", (width,))]
        layout += [(f"block{i}.norm.{key}", (width,)) for key in ("weight", "bias", "running_mean", "running_var")]
        layout += [(f"block{i}.norm.num_batches_tracked", ()), (f"block{i}.norm.alive", (width,))]
    return layout + [("to_image.weight", (1, 64, 3, 3)), ("to_image.bias", (1,)), ("to_image.weight_scale", (1,))]


ORIGINAL_28_DISCRIMINATOR = {"net.0.weight": (64, 11, 4, 4), "net.0.bias": (64,), "net.2.weight": (128, 64, 4, 4),
                             "net.2.bias": (128,), "net.4.weight": (1, 128, 7, 7), "net.4.bias": (1,)}


@pytest.mark.parametrize("size,channels", SHAPES)
@pytest.mark.parametrize("bits", [32, 8])
def test_generator_output_shape_and_range(size, channels, bits):
    G = Generator(nz=12, num_classes=3, channels=TINY_G[size], bits=bits, image_size=size, image_channels=channels)
    z, labels = G.sample_inputs(5)
    for mode in (G.train, G.eval):
        mode()
        images = G(z, labels)
        assert images.shape == (5, channels, size, size)
        assert images.min() >= -1 and images.max() <= 1
    assert G.prunable_layers == prunable_layers(size) and len(G.blocks()) == len(TINY_G[size])
    assert len(gamma_parameters(G)) == len(TINY_G[size])


@pytest.mark.parametrize("size,channels", SHAPES)
def test_generator_rebuilds_from_model_args_alone(size, channels):
    G = Generator(nz=12, num_classes=3, channels=TINY_G[size], bits=8, image_size=size, image_channels=channels)
    args = G.model_args()
    assert args["image_size"] == size and args["image_channels"] == channels
    clone = Generator(**args)
    clone.load_state_dict(G.state_dict())
    z, labels = G.sample_inputs(3)
    assert torch.equal(G.eval()(z, labels), clone.eval()(z, labels))


@pytest.mark.parametrize("size", [28, 32, 64])
def test_default_widths_follow_the_size(size):
    G, D = Generator(image_size=size, image_channels=3), Discriminator(image_size=size, image_channels=3)
    assert len(G.channels) == {28: 3, 32: 4, 64: 5}[size] and len(D.channels) == {28: 2, 32: 3, 64: 4}[size]
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1])) for b in G.blocks()]
    G.eval()(*G.sample_inputs(2))
    for hook in hooks:
        hook.remove()
    assert seen == {28: [7, 14, 28], 32: [4, 8, 16, 32], 64: [4, 8, 16, 32, 64]}[size]


def test_default_28_grey_models_keep_the_original_layout():
    G, D = Generator(), Discriminator()
    assert [(k, tuple(v.shape)) for k, v in G.state_dict().items()] == original_28_generator_layout()
    assert {k: tuple(v.shape) for k, v in D.state_dict().items()} == ORIGINAL_28_DISCRIMINATOR
    assert G.model_args()["image_size"] == 28 and Generator(**{**G.model_args()}).channels == (256, 128, 64)
    old_args = {k: v for k, v in G.model_args().items() if k != "image_size"}  # checkpoints written before sizes
    assert Generator(**old_args).image_size == 28


@pytest.mark.parametrize("bad", [dict(image_size=30), dict(image_channels=2), dict(image_size=32, channels=(8, 4, 2)),
                                 dict(image_size=64, channels=(8, 4, 2, 1))])
def test_generator_refuses_shapes_it_cannot_build(bad):
    with pytest.raises(ValueError):
        Generator(**bad)


@pytest.mark.filterwarnings("ignore:Full backward hook")  # Opacus's hooks, with images that need no gradient
@pytest.mark.parametrize("size,channels", SHAPES)
def test_discriminator_shape_opacus_validity_and_per_sample_gradients(size, channels):
    D = Discriminator(num_classes=3, channels=TINY_D[size], image_channels=channels, image_size=size)
    images = torch.rand(4, channels, size, size) * 2 - 1
    assert D(images, torch.arange(4) % 3).shape == (4,)
    assert ModuleValidator.validate(D, strict=False) == []
    wrapped = GradSampleModule(D)
    wrapped(images, torch.arange(4) % 3).sum().backward()
    for param in D.parameters():
        assert param.grad_sample.shape == (4, *param.shape)
    assert Discriminator(**D.model_args()).model_args() == D.model_args()


def test_discriminator_refuses_wrong_widths():
    with pytest.raises(ValueError):
        Discriminator(image_size=64, channels=(8, 8))


@pytest.mark.parametrize("bits", [8, 4])
def test_compression_of_a_32_pixel_rgb_student_is_exact(bits):
    dead = ([0, 3], [1, 2, 5], [4], [0, 1])
    student = handmade_student(channels=(10, 8, 7, 6), bits=bits, dead=dead, image_size=32, image_channels=3)
    compact = compress(student)
    assert compact.model_args() == {**student.model_args(), "channels": [8, 5, 6, 4]}
    assert compact.image_size == 32 and compact.image_channels == 3
    assert max_abs_difference(student, compact, 1024, seed=2) <= 1e-6
    assert summary(student, compact)["layers"] == ["block0", "block1", "block2", "block3"]
    for name, keep in zip(student.prunable_layers, kept_channels(student)):
        assert torch.equal(getattr(compact, name).conv.weight_scale, getattr(student, name).conv.weight_scale[keep])
    compact.refresh_quant_scales()  # the hidden maxima make recomputed scales change the function
    assert max_abs_difference(student, compact, 256) > 1e-3


def test_compression_and_artifact_of_a_64_pixel_grey_student():
    dead = ([1], [], [2, 3], [0], [4])
    student = handmade_student(channels=(6, 6, 6, 6, 6), bits=8, dead=dead, image_size=64, image_channels=1)
    compact = compress(student)
    assert list(compact.channels) == [5, 6, 4, 5, 5]
    assert max_abs_difference(student, compact, 256, seed=1) <= 1e-6
    reloaded = generator_from_artifact(artifact_dict(compact))
    z, labels = compact.sample_inputs(4)
    assert torch.equal(reloaded(z, labels), compact(z, labels))


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 3), (64, 1)])
def test_reference_classifier_follows_the_image_shape_and_reloads(tmp_path, size, channels):
    from utils.evaluation.metrics import predict, reference_classifier
    images = torch.rand(24, channels, size, size) * 2 - 1
    labels = torch.arange(24) % 3
    settings = {"epochs": 1, "seed": 0, "max_steps": 2}
    model, info = reference_classifier(str(tmp_path), "folder", (images, labels), (images, labels), settings)
    assert model.head.out_features == 3 and not info["cached"]
    again, cached = reference_classifier(str(tmp_path), "folder", (images, labels), (images, labels), settings)
    assert cached["cached"] and torch.equal(predict(model, images), predict(again, images))
