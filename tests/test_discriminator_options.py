"""The non-private teacher's two discriminator options (models/discriminator.py) and the guarantee that DP-SGD never
trains a discriminator that mixes samples (utils/privacy/dp.py, fine_tune.py).

- Minibatch standard deviation (`minibatch_std=G`, StyleGAN): one extra channel holding each group's std feature.
- Capacity: one more width than halvings adds a strided 3x3 conv (Bie, Kamath & Zhang 2023: 28-14-7-4).
"""
import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn

import fine_tune
from models import Discriminator, Generator
from models.discriminator import MINIBATCH_STD_EPSILON, MinibatchStdDev, std_group_size
from test_fine_tune import COMPACT_WIDTHS, private_split, public_ledger, run_fine_tune
from test_model_shapes import ORIGINAL_28_DISCRIMINATOR, SHAPES
from utils.privacy import dp
from utils.run.checkpoint import build_discriminator, load_checkpoint, new_run_dir, unwrapped_state_dict
from utils.run.cli import UserError
from utils.run.lifecycle import Run

TINY = {28: (4, 5), 32: (4, 5, 6), 64: (3, 4, 5, 6)}  # one width per halving
WIDER = {size: (*widths, 7) for size, widths in TINY.items()}  # one more: the extra 3x3 stride-2 conv


def has_std_layer(D) -> bool:
    return any(isinstance(module, MinibatchStdDev) for module in D.modules())


def inputs(n: int, size: int = 28, channels: int = 1, seed: int = 0):
    rng = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=rng) * 2 - 1, torch.arange(n) % 3


# ---------------------------------------------------------------- the minibatch std layer

def test_std_feature_of_a_constructed_batch():
    # two groups of two one-pixel samples: (0, 2) has std 1, (5, 5) has std 0
    x = torch.tensor([0.0, 2.0, 5.0, 5.0]).view(4, 1, 1, 1)
    out = MinibatchStdDev(2)(x)
    assert out.shape == (4, 2, 1, 1) and torch.equal(out[:, :1], x)
    expected = [1.0, 1.0, 0.0, 0.0]
    assert torch.allclose(out[:, 1].flatten(), torch.tensor(expected).add(MINIBATCH_STD_EPSILON).sqrt())


def test_std_feature_is_each_groups_mean_std_over_features_and_pixels():
    x = torch.randn(8, 3, 2, 5, generator=torch.Generator().manual_seed(1))
    out = MinibatchStdDev(4)(x)
    for sample in range(8):
        group = x[4 * (sample // 4): 4 * (sample // 4) + 4].double()
        by_hand = (group - group.mean(0)).pow(2).mean(0).add(MINIBATCH_STD_EPSILON).sqrt().mean()
        assert torch.allclose(out[sample, 3], by_hand.float().expand(2, 5))
    assert torch.equal(out[:, :3], x)


@pytest.mark.parametrize("batch,group", [(8, 4), (6, 3), (7, 1), (2, 2), (1, 1), (9, 3), (4, 4)])
def test_group_size_is_the_largest_divisor_of_the_batch_up_to_g(batch, group):
    assert std_group_size(batch, 4) == group
    x = torch.randn(batch, 2, 3, 3, generator=torch.Generator().manual_seed(batch))
    feature = MinibatchStdDev(4)(x)[:, 2, 0, 0]
    for start in range(0, batch, group):
        block = x[start:start + group]
        by_hand = (block.var(0, unbiased=False) + MINIBATCH_STD_EPSILON).sqrt().mean()
        assert torch.allclose(feature[start:start + group], by_hand.expand(group))


def test_a_batch_of_one_has_zero_std():
    D = Discriminator(num_classes=3, channels=TINY[28], minibatch_std=4)
    seen = []
    D.net[-1].register_forward_hook(lambda module, args, out: seen.append(args[0][:, -1]))
    assert D(*inputs(1)).shape == (1,)
    assert torch.allclose(seen[0], torch.full((1, 7, 7), MINIBATCH_STD_EPSILON ** 0.5))


@pytest.mark.parametrize("minibatch_std", [0, 4])
def test_a_samples_logit_depends_on_its_group_only_with_the_layer(minibatch_std):
    torch.manual_seed(0)
    D = Discriminator(num_classes=3, channels=TINY[28], minibatch_std=minibatch_std)
    images, labels = inputs(8)
    changed = images.clone()
    changed[3] = -changed[3]  # another sample of sample 0's group (0-3)
    changed[7] = -changed[7]  # a sample of the other group (4-7)
    before, after = D(images, labels), D(changed, labels)
    same = before[:3] == after[:3]  # samples 0-2 did not change themselves
    assert not same.any() if minibatch_std else same.all()
    one_group_only = changed.clone()
    one_group_only[:4] = images[:4]  # only the second group changed
    assert torch.equal(D(one_group_only, labels)[:4], before[:4])


# ---------------------------------------------------------------- capacity: one more strided conv

@pytest.mark.parametrize("size,channels", SHAPES)
@pytest.mark.parametrize("minibatch_std", [0, 4])
def test_one_more_width_adds_a_strided_3x3_conv(size, channels, minibatch_std):
    D = Discriminator(num_classes=3, channels=WIDER[size], image_channels=channels, image_size=size,
                      minibatch_std=minibatch_std)
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    strided = [conv for conv in convs if conv.stride == (2, 2)]
    assert len(strided) == len(WIDER[size]) and strided[-1].kernel_size == (3, 3)
    assert all(conv.kernel_size == (4, 4) for conv in strided[:-1])
    assert isinstance(D.net[list(D.net).index(strided[-1]) + 1], nn.LeakyReLU)
    seen = []
    D.net[-1].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[-1]))
    assert D(*inputs(4, size, channels)).shape == (4,)
    side = {28: 4, 32: 2, 64: 2}[size]
    assert seen == [side] and convs[-1].kernel_size == (side, side)
    assert convs[-1].in_channels == WIDER[size][-1] + (1 if minibatch_std else 0)


def test_the_published_28_pixel_layout():
    D = Discriminator(channels=(128, 256, 512))
    sides = []
    for module in D.net:
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda m, args, out: sides.append(out.shape[-1]))
    D(*inputs(2))
    assert sides == [14, 7, 4, 1]


@pytest.mark.parametrize("widths", [(8,), (8, 8, 8, 8)])
def test_other_width_counts_are_refused(widths):
    with pytest.raises(ValueError, match="2 or 3 positive widths for 28x28 images"):
        Discriminator(channels=widths)


def test_the_default_layout_is_unchanged():
    torch.manual_seed(3)
    D = Discriminator(minibatch_std=0)
    torch.manual_seed(3)
    default = Discriminator()
    assert {k: tuple(v.shape) for k, v in D.state_dict().items()} == ORIGINAL_28_DISCRIMINATOR
    assert all(torch.equal(v, default.state_dict()[k]) for k, v in D.state_dict().items())
    assert default.model_args()["minibatch_std"] == 0 and not has_std_layer(default)


@pytest.mark.parametrize("channels,minibatch_std", [(TINY[28], 4), (WIDER[28], 0), (WIDER[28], 2)])
def test_model_args_rebuild_both_options(channels, minibatch_std):
    D = Discriminator(num_classes=3, channels=channels, minibatch_std=minibatch_std)
    clone = Discriminator(**D.model_args())
    clone.load_state_dict(D.state_dict())
    assert clone.model_args() == D.model_args()
    images, labels = inputs(4)
    assert torch.equal(clone(images, labels), D(images, labels))
    rebuilt = build_discriminator({"model_args": {"discriminator": D.model_args()},
                                   "discriminator": unwrapped_state_dict(D)})  # what every stage calls
    assert has_std_layer(rebuilt) is bool(minibatch_std) and torch.equal(rebuilt(images, labels), D(images, labels))


def test_model_args_from_before_the_options_build_the_plain_discriminator():
    old = {"num_classes": 10, "channels": [8, 8], "image_channels": 1, "image_size": 28}
    assert Discriminator(**old).minibatch_std == 0 and not has_std_layer(Discriminator(**old))


# ---------------------------------------------------------------- DP-SGD never trains a mixing discriminator

def test_opacus_validator_rejects_the_std_layer_and_accepts_the_others():
    dp.register_opacus_validators()
    with pytest.raises(UnsupportedModuleError, match="minibatch std"):
        ModuleValidator.validate(Discriminator(channels=TINY[28], minibatch_std=4), strict=True)
    assert ModuleValidator.validate(Discriminator(channels=TINY[28]), strict=True) == []
    wider = Discriminator(num_classes=3, channels=WIDER[28])
    assert ModuleValidator.validate(wider, strict=True) == []


@pytest.mark.filterwarnings("ignore:Full backward hook")  # Opacus's hooks, with images that need no gradient
def test_the_wider_discriminator_has_per_sample_gradients():
    D = Discriminator(num_classes=3, channels=WIDER[28])
    GradSampleModule(D)(*inputs(4)).sum().backward()
    assert all(param.grad_sample.shape == (4, *param.shape) for param in D.parameters())


def test_private_discriminator_refuses_the_std_layer(tiny_data_root):
    D = Discriminator(channels=(8, 8), minibatch_std=4)
    config = dp.DPConfig(accountant="rdp")
    with pytest.raises(UserError, match="minibatch std layer") as refused:
        dp.PrivateDiscriminator(D, torch.optim.Adam(D.parameters()), private_split(tiny_data_root), 32, 1.0, config)
    assert "\n" not in str(refused.value)


def test_without_minibatch_std_keeps_the_function_when_the_std_weights_are_zero():
    torch.manual_seed(0)
    D = Discriminator(num_classes=3, channels=WIDER[28], minibatch_std=4)
    with torch.no_grad():
        D.net[-1].weight[:, -1] = 0.0
    plain = D.without_minibatch_std()
    assert not has_std_layer(plain) and plain.model_args() == {**D.model_args(), "minibatch_std": 0}
    assert plain.training and plain is not D
    images, labels = inputs(8)
    assert torch.allclose(plain(images, labels), D(images, labels), atol=1e-6)
    with torch.no_grad():
        D.net[-1].weight[:, -1] = 1.0  # the std channel counts again: the logits differ
    assert not torch.allclose(plain(images, labels), D(images, labels), atol=1e-3)


def write_compact_with_std_layer(out, ledger) -> str:
    """A compact-stage checkpoint (as test_fine_tune.write_compact) whose discriminator has the std layer, as it
    has when the teacher was trained with one (the student and the compact run carry the teacher's)."""
    torch.manual_seed(0)
    G, D = Generator(channels=COMPACT_WIDTHS, bits=8), Discriminator(channels=(8, 8), minibatch_std=4)
    checkpoint = {"stage": "compact", "step": 0, "args": {}, "parent": None, "privacy": ledger, "teacher": None,
                  "model_args": {"generator": G.model_args(), "discriminator": D.model_args()},
                  "generator": unwrapped_state_dict(G), "discriminator": unwrapped_state_dict(D)}
    run_dir = new_run_dir(str(out), "compact", "x")
    Run(run_dir, "compact").save(checkpoint)
    return run_dir


def test_fine_tune_strips_the_std_layer(tiny_data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fine_tune, "write_device_artifacts", lambda run_dir, G: {})  # not about the export
    compact = write_compact_with_std_layer(tmp_path, public_ledger(tiny_data_root))
    assert has_std_layer(build_discriminator(load_checkpoint(compact)))
    run_dir = run_fine_tune(tiny_data_root, tmp_path, "--noise-multiplier", "1.0", "--max-steps", "2")
    assert "minibatch std layer is removed" in capsys.readouterr().err
    checkpoint = load_checkpoint(run_dir, "private")
    assert checkpoint["step"] == 2 and checkpoint["model_args"]["discriminator"]["minibatch_std"] == 0
    assert not has_std_layer(build_discriminator(checkpoint))
