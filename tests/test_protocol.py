"""The downstream protocol of Bie et al. 2023 and precision/recall (utils/evaluation/metrics.py): the hold-out is the
generated tail and the real test set chooses nothing; real images beat noise; precision and recall are 1 on
identical sets and recall is low on a collapsed set."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_PUBLIC
from utils.data.datasets import load_split, to_unit_range
from utils.evaluation import metrics
from utils.evaluation.metrics import (PROTOCOL, QUICK_PROTOCOL, DownstreamProtocol, MnistCNN, knn_radii,
                                      precision_recall, protocol_accuracy, protocol_variant, real_data_ceiling)

TINY_PROTOCOL = DownstreamProtocol(name="tiny", num_samples=600, holdout=100, epochs=3, batch_size=50)


def tiny(data_root, split):
    """The tiny set at 14x14 (the class bars stay distinct): a quarter of the protocol CNN's cost at 28x28."""
    data = load_split("fashion-mnist", split, data_root, public_size=TINY_PUBLIC)
    return F.avg_pool2d(to_unit_range(data.images), 2), data.labels


def test_published_settings_and_the_quick_variant_is_labelled():
    assert (PROTOCOL.num_samples, PROTOCOL.holdout, PROTOCOL.epochs, PROTOCOL.batch_size, PROTOCOL.lr) == (
        60000, 5000, 10, 64, 1e-3)
    assert "Bie et al. 2023" in PROTOCOL.describe() and "quick" in QUICK_PROTOCOL.describe()
    assert QUICK_PROTOCOL.num_samples < PROTOCOL.num_samples and QUICK_PROTOCOL.epochs < PROTOCOL.epochs
    assert protocol_variant(PROTOCOL) is PROTOCOL and protocol_variant(QUICK_PROTOCOL, epochs=2) is QUICK_PROTOCOL
    custom = protocol_variant(PROTOCOL, num_samples=1200, epochs=1)
    assert (custom.num_samples, custom.holdout, custom.epochs) == (1200, 100, 1) and "custom" in custom.name


def test_the_cnn_is_the_pytorch_mnist_example():
    model = MnistCNN()
    layers = [type(m).__name__ for m in model.net]
    assert layers == ["Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Dropout", "Flatten", "Linear", "ReLU",
                      "Dropout", "Linear"]
    conv1, conv2, fc1, fc2 = model.net[0], model.net[2], model.net[7], model.net[10]
    assert (conv1.out_channels, conv2.out_channels, fc1.in_features, fc1.out_features, fc2.out_features) == (
        32, 64, 9216, 128, 10)
    assert (model.net[5].p, model.net[9].p) == (0.25, 0.5)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def spy_on_training(monkeypatch):
    """Record every (what, tensor) the protocol trains on or scores, in order."""
    calls = []
    train_epoch, score = metrics._train_one_epoch, metrics.accuracy

    def spy_train(model, optimizer, images, labels, *rest):
        calls.append(("train", images))
        return train_epoch(model, optimizer, images, labels, *rest)

    def spy_score(model, images, labels):
        calls.append(("score", images))
        return score(model, images, labels)

    monkeypatch.setattr(metrics, "_train_one_epoch", spy_train)
    monkeypatch.setattr(metrics, "accuracy", spy_score)
    return calls


def test_the_holdout_is_the_generated_tail_and_the_test_set_is_scored_once_after_the_choice(
        tiny_data_root, monkeypatch):
    images, labels = tiny(tiny_data_root, "all")
    test_images, test_labels = tiny(tiny_data_root, "test")
    calls = spy_on_training(monkeypatch)
    result = protocol_accuracy(images, labels, test_images, test_labels, TINY_PROTOCOL)

    holdout = TINY_PROTOCOL.holdout
    assert [kind for kind, _ in calls] == ["train", "score"] * TINY_PROTOCOL.epochs + ["score"]
    for kind, seen in calls[:-1]:
        expected = images[:-holdout] if kind == "train" else images[-holdout:]
        assert torch.equal(seen, expected)  # trains on the head only, chooses on the tail only
    assert torch.equal(calls[-1][1], test_images)  # the test set: once, at the end
    assert result["train_size"] == len(labels) - holdout
    assert result["epoch"] == 1 + int(np.argmax(result["holdout_accuracy"]))


def test_the_test_set_chooses_nothing(tiny_data_root):
    images, labels = tiny(tiny_data_root, "all")
    test_images, test_labels = tiny(tiny_data_root, "test")
    scrambled = test_labels[torch.randperm(len(test_labels), generator=torch.Generator().manual_seed(3))]
    honest = protocol_accuracy(images, labels, test_images, test_labels, TINY_PROTOCOL)
    other = protocol_accuracy(images, labels, test_images, scrambled, TINY_PROTOCOL)
    assert honest["epoch"] == other["epoch"] and honest["holdout_accuracy"] == other["holdout_accuracy"]
    assert honest["test_accuracy"] > other["test_accuracy"]


def test_on_real_images_the_protocol_beats_noise_and_holds_out_the_protocols_share(tiny_data_root):
    images, labels = tiny(tiny_data_root, "all")
    test = tiny(tiny_data_root, "test")
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real = real_data_ceiling(images, labels, *test, TINY_PROTOCOL)
    fake = protocol_accuracy(noise, labels, *test, TINY_PROTOCOL)["test_accuracy"]
    assert real["test_accuracy"] > 0.8 and real["test_accuracy"] > fake + 0.4
    assert real["train_size"] == len(labels) - round(len(labels) * 100 / 600)  # 1/6 held out, as in the protocol
    assert real["protocol"]["num_samples"] == len(labels) and "real images" in real["protocol"]["name"]


def test_a_holdout_as_large_as_the_set_is_refused():
    with pytest.raises(ValueError, match="hold-out"):
        protocol_accuracy(torch.zeros(10, 1, 28, 28), torch.zeros(10, dtype=torch.long), torch.zeros(1, 1, 28, 28),
                          torch.zeros(1, dtype=torch.long), DownstreamProtocol(holdout=10))


# ---------------------------------------------------------------- precision and recall

def test_knn_radii_match_a_brute_force_search():
    points = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    distances = np.linalg.norm(points.numpy()[:, None] - points.numpy()[None], axis=-1)
    expected = np.sort(distances, axis=1)[:, 3]  # column 0 is the point itself
    assert np.allclose(knn_radii(points, k=3, chunk=7).numpy(), expected)


def test_identical_sets_give_precision_and_recall_one():
    features = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    result = precision_recall(features, features.clone(), k=3)
    assert result["precision"] == 1.0 and result["recall"] == 1.0


def test_a_collapsed_set_has_low_recall_and_a_shifted_set_low_precision():
    rng = torch.Generator().manual_seed(1)
    real = torch.randn(500, 16, generator=rng)
    modes = real[:10].repeat_interleave(50, dim=0)  # ten real points, each generated 50 times with tiny noise
    collapsed = precision_recall(real, modes + 0.01 * torch.randn(500, 16, generator=rng))
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.1
    shifted = precision_recall(real, torch.randn(500, 16, generator=rng) + 4.0)
    assert shifted["precision"] < 0.1
    fresh = precision_recall(real, torch.randn(500, 16, generator=rng))  # same distribution, other samples
    assert fresh["precision"] > 0.6 and fresh["recall"] > 0.6
