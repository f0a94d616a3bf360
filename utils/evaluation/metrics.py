"""Quality and privacy metrics of generators (docs/DESIGN.md, "Evaluation").

- A small 2-conv CNN classifier (`SmallCNN`) serves twice: trained on the real training set it is the cached
  *reference classifier*, whose penultimate layer is the feature space of the Frechet distance; trained only on
  generated, labelled samples and tested on the real test set it gives the *downstream accuracy* (fixed epochs,
  final-epoch accuracy: no model selection on the test set).
- `protocol_accuracy`: the published downstream protocol of Bie, Kamath & Zhang (2023, "Private GANs, revisited"),
  settings in `DownstreamProtocol`: the CNN of the PyTorch MNIST example (`MnistCNN`) trained on class-balanced
  generated samples whose last `holdout` are held out; the epoch that scores best on that generated hold-out is
  the one whose real-test accuracy is reported, so the real test set chooses nothing. `QUICK_PROTOCOL` is a
  cheaper variant for smoke runs, labelled as such (its numbers are not comparable with published ones).
- `precision_recall`: improved precision and recall (Kynkaenniemi et al. 2019): each set's manifold is the union
  of balls reaching every point's k-th nearest neighbour; precision is the share of generated points inside the
  real manifold, recall the share of real points inside the generated one. Within-class collapse shows as low
  recall.
- `frechet_distance`: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), with the trace of the matrix square root
  computed from the eigenvalues of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2), which
  is stable and never produces an imaginary part.
- `membership_auc`: the distance-to-nearest-generated-sample attack (score = -min L2 distance from a candidate to
  the generated set), AUC of members against non-members by the Mann-Whitney rank statistic. About 0.5 means no
  measurable leakage; near 1 means generated samples sit on top of training images.

The reference classifier and the audit read real (also private) data: they are the data holder's own
measurements, not part of the released generator, and their numbers are not covered by the DP guarantee.
"""
import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.privacy.audit import nearest_distances, rank_auc
from utils.run.checkpoint import load_checkpoint, save_checkpoint, versions
from utils.run.cli import progress_bar
from utils.run.precision import FP32

CLASSIFIER_VERSION = 1  # bump when SmallCNN or its training changes: invalidates cached reference classifiers


class SmallCNN(nn.Module):
    """conv3x3(16) - ReLU - pool - conv3x3(32) - ReLU - pool - fc(hidden) - ReLU [features] - fc(classes), for
    (image_channels, image_size, image_size) inputs (1x28x28 by default)."""

    def __init__(self, num_classes: int = 10, channels=(16, 32), hidden: int = 128, image_channels: int = 1,
                 image_size: int = 28):
        super().__init__()
        c0, c1 = channels
        self.shape_args = {"num_classes": num_classes, "image_channels": image_channels, "image_size": image_size}
        self.body = nn.Sequential(
            nn.Conv2d(image_channels, c0, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c0, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c1 * (image_size // 4) ** 2, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# ---------------------------------------------------------------- classifier training

def classes_in(*label_sets) -> int:
    """Number of classes of labelled data: one more than the largest label."""
    return 1 + max(int(labels.max()) for labels in label_sets)


def seeded_classifier(seed: int, num_classes: int = 10, image_shape=(1, 28, 28)) -> SmallCNN:
    """A freshly initialised SmallCNN for (C, S, S) images that depends only on `seed` (the global RNG is left
    untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN(num_classes, image_channels=image_shape[0], image_size=image_shape[-1])


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int, batch_size: int = 128,
                     lr: float = 1e-3, max_steps: int = None, device="cpu", desc: str = "classifier",
                     num_classes: int = 10) -> SmallCNN:
    """Train a SmallCNN on images in [-1, 1] (N, C, H, W) for a fixed number of epochs (or `max_steps`)."""
    model = seeded_classifier(seed, num_classes, tuple(images.shape[1:])).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr)
    rng = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, -(-len(labels) // batch_size))
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    step = 0
    with progress_bar(total=total, desc=desc, leave=False) as progress:
        while step < total:
            step += _train_one_epoch(model, optimizer, images, labels, batch_size, rng, device,
                                     max_batches=total - step, progress=progress)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 1000, features: bool = False) -> torch.Tensor:
    """Logits (or penultimate features) of `images`, in eval mode, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    run = model.features if features else model
    return torch.cat([run(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(model, images).argmax(1) == labels).float().mean())


def downstream_accuracy(train_images, train_labels, test_images, test_labels, epochs: int, seed: int,
                        max_steps: int = None, device="cpu", desc: str = "downstream") -> float:
    """Test accuracy of a SmallCNN trained only on (train_images, train_labels), after its last epoch."""
    model = train_classifier(train_images, train_labels, epochs, seed, max_steps=max_steps, device=device, desc=desc,
                             num_classes=classes_in(train_labels, test_labels))
    return accuracy(model, test_images, test_labels)


# ---------------------------------------------------------------- cached reference classifier

def data_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """Hash of the content of a labelled image set (not just its indices: another data root changes it)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(images.numpy()).tobytes())
    digest.update(np.ascontiguousarray(labels.numpy()).tobytes())
    return digest.hexdigest()[:16]


def reference_key(dataset: str, fingerprint: str, settings: dict) -> str:
    text = json.dumps({"dataset": dataset, "train": fingerprint, "settings": settings,
                       "version": CLASSIFIER_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reference_classifier(cache_dir: str, dataset: str, train, test, settings: dict, device="cpu"):
    """(classifier, info) trained on the real training set, or loaded from `cache_dir` if trained before.

    `train`/`test` are (images in [-1, 1], labels); `settings` holds epochs, seed, max_steps (all in the cache
    key, with the dataset and a fingerprint of the training set). `info` has the classifier's test accuracy."""
    fingerprint = data_fingerprint(*train)
    key = reference_key(dataset, fingerprint, settings)
    path = os.path.join(cache_dir, f"{dataset}-{key}.pt")
    if os.path.isfile(path):
        checkpoint = load_checkpoint(path, "reference")
        model = SmallCNN(**checkpoint.get("shape_args", {"num_classes": checkpoint["num_classes"]}))
        model.load_state_dict(checkpoint["classifier"])
        return model.to(device).eval(), {**checkpoint["info"], "path": path, "cached": True}
    start = time.time()
    model = train_classifier(*train, epochs=settings["epochs"], seed=settings["seed"],
                             max_steps=settings.get("max_steps"), device=device, desc="reference classifier",
                             num_classes=classes_in(train[1], test[1]))
    info = {"dataset": dataset, "train_fingerprint": fingerprint, "train_size": len(train[1]), "key": key,
            "settings": settings, "test_accuracy": accuracy(model, *test), "train_seconds": time.time() - start}
    os.makedirs(cache_dir, exist_ok=True)
    save_checkpoint(cache_dir, {"stage": "reference", "classifier": {k: v.cpu() for k, v in model.state_dict().items()},
                                "num_classes": model.head.out_features, "shape_args": model.shape_args,
                                "info": info, "versions": versions()},
                    name=os.path.basename(path))
    return model, {**info, "path": path, "cached": False}


# ---------------------------------------------------------------- Frechet distance

def feature_statistics(features) -> tuple:
    """Mean and covariance (float64) of a (N, D) feature matrix."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_cross))


def frechet_distance_of(features_a, features_b) -> float:
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


# ---------------------------------------------------------------- membership-inference audit

def membership_auc(members, nonmembers, generated, member_labels=None, nonmember_labels=None,
                   generated_labels=None) -> float:
    """AUC of the distance-to-nearest-generated-sample attack (score = -distance) on members vs non-members."""
    member_scores = -nearest_distances(members, generated, member_labels, generated_labels)
    nonmember_scores = -nearest_distances(nonmembers, generated, nonmember_labels, generated_labels)
    return rank_auc(member_scores.numpy(), nonmember_scores.numpy())


# ---------------------------------------------------------------- downstream protocol (Bie et al. 2023)

class MnistCNN(nn.Module):
    """The CNN of the PyTorch MNIST example: conv3x3(32) - ReLU - conv3x3(64) - ReLU - max-pool - dropout 0.25 -
    fc(128) - ReLU - dropout 0.5 - fc(classes); the classifier of Bie et al.'s downstream protocol."""

    def __init__(self, num_classes: int = 10, image_channels: int = 1, image_size: int = 28):
        super().__init__()
        pooled = (image_size - 4) // 2
        self.net = nn.Sequential(
            nn.Conv2d(image_channels, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Dropout(0.25), nn.Flatten(), nn.Linear(64 * pooled * pooled, 128), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class DownstreamProtocol:
    """Settings of the downstream protocol: `num_samples` class-balanced generated samples, the last `holdout`
    of them used only to choose the epoch; Adam(`lr`), batch `batch_size`, `epochs` epochs."""
    name: str = "Bie et al. 2023"
    num_samples: int = 60000
    holdout: int = 5000
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0

    def describe(self) -> str:
        return (f"{self.name}: MNIST-example CNN trained on {self.num_samples - self.holdout} of "
                f"{self.num_samples} class-balanced generated samples, Adam lr {self.lr:g}, batch "
                f"{self.batch_size}, {self.epochs} epochs; real-test accuracy at the epoch best on the last "
                f"{self.holdout} generated samples (held out)")


PROTOCOL = DownstreamProtocol()
# `make pipeline`'s variant (a tenth of the samples, two epochs: about 160 classifier steps instead of 8600);
# its numbers are for smoke runs and probes, never for comparison with published ones
QUICK_PROTOCOL = DownstreamProtocol(name="quick variant (not the published protocol)", num_samples=6000,
                                    holdout=1000, epochs=2)


def protocol_variant(base: DownstreamProtocol, num_samples: int = None, epochs: int = None) -> DownstreamProtocol:
    """`base` with other sample counts or epochs (tests, budgets): the hold-out keeps its share of the samples,
    and the name says it is not `base` unless nothing changed."""
    num_samples, epochs = num_samples or base.num_samples, epochs or base.epochs
    if (num_samples, epochs) == (base.num_samples, base.epochs):
        return base
    holdout = max(1, round(num_samples * base.holdout / base.num_samples))
    name = f"custom variant of {base.name} ({num_samples} samples, {epochs} epochs)"
    return replace(base, name=name, num_samples=num_samples, holdout=holdout, epochs=epochs)


def _train_one_epoch(model, optimizer, images, labels, batch_size: int, rng: torch.Generator, device,
                     max_batches: int = None, progress=None) -> int:
    """One pass over a fresh permutation from `rng` (stopping after `max_batches`); returns the batches taken."""
    model.train()
    order = torch.randperm(len(labels), generator=rng)
    starts = range(0, len(labels), batch_size)[:max_batches]
    for start in starts:
        batch = order[start:start + batch_size]
        loss = F.cross_entropy(model(images[batch].to(device)), labels[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress is not None:
            progress.update(1)
    return len(starts)


def protocol_accuracy(images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                      test_labels: torch.Tensor, protocol: DownstreamProtocol = PROTOCOL, device="cpu",
                      desc: str = "downstream", precision=FP32) -> dict:
    """Real-test accuracy of an MnistCNN trained on `images[:-holdout]`, at the epoch best on the generated
    hold-out `images[-holdout:]` (ties: the earliest). The test set is scored once, after the choice. The
    classifier's forward passes run in `precision` (utils/run/precision.py); its weights and updates in float32.

    Returns test_accuracy, epoch (1-based), holdout_accuracy (per epoch), train_size and the protocol."""
    if not 0 < protocol.holdout < len(labels):
        raise ValueError(f"hold-out of {protocol.holdout} needs more than that many samples, got {len(labels)}")
    train_images, train_labels = images[:-protocol.holdout], labels[:-protocol.holdout]
    holdout_images, holdout_labels = images[-protocol.holdout:], labels[-protocol.holdout:]
    with torch.random.fork_rng(devices=[]):  # initialisation and dropout depend only on the protocol's seed
        torch.manual_seed(protocol.seed)
        num_classes = 1 + max(int(labels.max()), int(test_labels.max()))
        model = MnistCNN(num_classes, images.shape[1], images.shape[-1]).to(device)
        precision.prepare(model)
        forward = precision.wrap(model)
        optimizer = torch.optim.Adam(model.parameters(), protocol.lr)
        rng = torch.Generator().manual_seed(protocol.seed)
        curve, best_state = [], None
        for _ in progress_bar(range(protocol.epochs), desc=desc, leave=False):
            _train_one_epoch(forward, optimizer, train_images, train_labels, protocol.batch_size, rng, device)
            curve.append(accuracy(forward, holdout_images, holdout_labels))
            if curve[-1] > max(curve[:-1], default=-1.0):
                best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return {"test_accuracy": accuracy(forward, test_images, test_labels), "epoch": 1 + curve.index(max(curve)),
            "holdout_accuracy": curve, "train_size": len(train_labels), "protocol": asdict(protocol)}


def real_data_ceiling(images: torch.Tensor, labels: torch.Tensor, test_images: torch.Tensor,
                      test_labels: torch.Tensor, protocol: DownstreamProtocol = PROTOCOL, device="cpu") -> dict:
    """The protocol on real training images: a seeded shuffle (real sets are not in balanced order), then the
    same share held out as the protocol holds out of its generated samples (5000 of 60000: 1/12)."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(protocol.seed))
    holdout = max(1, round(len(labels) * protocol.holdout / protocol.num_samples))
    real = replace(protocol, name=f"{protocol.name} on real images", num_samples=len(labels), holdout=holdout)
    return protocol_accuracy(images[order], labels[order], test_images, test_labels, real, device, "real ceiling")


# ---------------------------------------------------------------- precision and recall (k-NN manifolds)

@torch.no_grad()
def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1000) -> torch.Tensor:
    """Distance from every point to its k-th nearest neighbour in the same set (itself not counted)."""
    if len(features) <= k:
        raise ValueError(f"k = {k} nearest neighbours need more than {k} points, got {len(features)}")
    features = features.reshape(len(features), -1).double()
    radii = [torch.cdist(features[i:i + chunk], features).kthvalue(k + 1, dim=1).values
             for i in range(0, len(features), chunk)]  # the (k+1)-th smallest: the first is the point itself
    return torch.cat(radii)


@torch.no_grad()
def manifold_coverage(points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, chunk: int = 1000) -> float:
    """Share of `points` within radii[j] of some manifold point j."""
    points, manifold = points.reshape(len(points), -1).double(), manifold.reshape(len(manifold), -1).double()
    inside = [(torch.cdist(points[i:i + chunk], manifold) <= radii[None, :]).any(dim=1)
              for i in range(0, len(points), chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real_features, fake_features, k: int = 3) -> dict:
    """Improved precision and recall (Kynkaenniemi et al. 2019) of generated features against real ones."""
    real, fake = torch.as_tensor(real_features), torch.as_tensor(fake_features)
    return {"precision": manifold_coverage(fake, real, knn_radii(real, k)),
            "recall": manifold_coverage(real, fake, knn_radii(fake, k)), "k": k}
