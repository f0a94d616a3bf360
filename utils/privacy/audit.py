"""Empirical privacy audit from one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

The computed epsilon is a claim; this module tests it. m canaries are built, each inserted into the private split
independently with probability 1/2 from a seeded draw, a DP stage trains on the split with the included ones, an
attack scores every canary, and the auditor guesses "in" for the k highest scores and "out" for the k lowest. If
the training is (epsilon, delta)-DP, the number of correct guesses cannot be much larger than that of randomized
response with accuracy e^eps / (1 + e^eps); the largest epsilon the observed count rules out (at 95% confidence)
is an empirical LOWER bound on the true epsilon.

- Canaries, two kinds (`--audit-canary-kind`):
  - "generated" (the default): m samples of the audited stage's starting generator (public), drawn from a
    seeded generator in training mode and in batches of the run's expected batch size, exactly as the fakes D is
    trained to reject, each labelled with the class it was drawn for. D can only call an included one real by
    remembering that very image: its generalisation says "fake". Measured (docs/DESIGN.md, "Privacy"): a
    non-private discriminator gives them a membership AUC of about 0.96 where the mislabelled kind stays at 0.5.
  - "mislabelled": m test-set images (never in any training split), each with a WRONG label: the true label plus
    a seeded offset in 1..9 (mod 10). Kept for comparison: the discriminator barely uses the label, scores real
    images as real whatever their label, and its loss on them saturates, so it does not remember them.
  An audit run stores its canaries (`canaries.pt`, checked against the ledger's fingerprints by audit.py).
- Inclusion: one Bernoulli(1/2) per canary from its own seeded generator (`inclusion_draw`). The normal private
  split is untouched: its index set, its fingerprint and a normal run's ledger are the same whether or not this
  module exists. The audit split is the private split plus the included canaries, and an audit run's ledger
  carries an "audits" entry (`utils.privacy.ledger.record_audit`) with the seed and which canaries went in.
- Audit subset (`fine_tune.py --audit-subset N`): the non-canary part of the audit split is a seeded draw of N
  private images (`utils.data.datasets.seeded_subset`; N, seed and the fingerprint of the chosen images in the audit
  entry), so that a run of minutes shows each canary tens of times instead of at most once. This is valid: the
  bound of Theorem 3.1 holds for ANY fixed non-canary data set, since DP is a guarantee per example, whatever the
  other examples are; the subset is drawn before, and independently of, the canaries' inclusion. The sample rate
  (and so the claimed epsilon the audit tests) is B / (N + included canaries), the audit split's real size.
- Attacks: white-box, the final discriminator's logit on (canary, its label), minus the logit of the discriminator
  the stage started from where given (the public starting point: removing each canary's prior score leaves what
  training added), and for mislabelled canaries minus the same change on the canary's image under its other wrong
  labels (what training did to the image whatever its label); black-box, minus the L2 distance of the canary to its
  nearest generated sample of the canary's label.
- Guesses: "in" on the k+ highest scores, "out" on the k- lowest, abstain on the rest (r = k+ + k-). A canary
  the training never sampled looks like a non-member, so membership shows mostly at the top: besides k+ = k-,
  the one-sided k- = 0 is tried (as in the paper's experiments).
- Bound: Theorem 3.1 of the paper, computed as in its Algorithm 2 (the p-value of v correct guesses out of r
  under the (eps, delta)-DP null, searched for the largest rejected eps). The paper tries several k and reports
  the best; here the (k+, k-) are fixed in advance (`AuditSettings.guess_plans`) and the significance is split
  among them (Bonferroni), so the reported maximum is itself a valid 95% lower bound (one per attack: with both
  attacks reported, the chance that either is wrong is at most 10%). With m canaries the bound cannot exceed
  what m correct guesses give (about 5.1 for m = 1000, ten plans, delta = 1e-5): a larger claimed epsilon cannot be
  refuted, only a smaller one.
- AUC of each attack (members = included canaries) with a 95% Hanley-McNeil (1982) interval.

Simplifications, stated: the (k+, k-) are fixed in advance with a Bonferroni correction instead of the paper's
best k after the fact; the audit run's sample rate is B / (N + included canaries), N the private split's (or
the subset's) size, so it moves with the draw (by about 1 part in 100 for m = 1000 and the whole split; more on a
small subset) and the accountant, as for every run, takes q as given.
"""
import copy
import hashlib
import math
import os
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.stats
import torch

from utils.data.datasets import ImageSplit, index_fingerprint, to_unit_range
from utils.data.distill import encode_images
from utils.run.cli import UserError

SIGNIFICANCE = 0.05  # the paper's 95% confidence
CANARY_SEED_OFFSET = 15485863  # canary draws differ from --seed's other generators
CANARY_SOURCE = "test"
# an audit run's DP machinery: as configured, switched off (no clipping, no noise), or noise with clipping off
AUDIT_CONTROLS = ("none", "no-dp", "no-clip")
CANARY_KINDS = ("generated", "mislabelled")
CANARY_DESCRIPTIONS = {"generated": "samples of the starting generator, inserted as real",
                       "mislabelled": "mislabelled test images"}
CANARY_FILE = "canaries.pt"


@dataclass
class AuditSettings:
    canaries: int = 1000  # m
    seed: int = 0
    guess_fractions: tuple = (0.02, 0.05, 0.1, 0.2, 0.5)  # k+ = fraction * m, fixed in advance
    significance: float = SIGNIFICANCE
    kind: str = "mislabelled"

    def guess_plans(self) -> list:
        """The (k+, k-) tried: for each k+ = fraction * m (at least 1, at most m // 2), k- = k+ and k- = 0."""
        ks = sorted({min(self.canaries // 2, max(1, round(f * self.canaries))) for f in self.guess_fractions})
        return [(k, k_minus) for k in ks for k_minus in (k, 0)]


# ---------------------------------------------------------------- canaries and their inclusion

@dataclass
class Canaries:
    """m canary images: uint8 in the private split's layout, the labels they are inserted with, their true
    labels, where they came from, which were included, and their kind (`CANARY_KINDS`)."""
    images: torch.Tensor
    labels: torch.Tensor
    true_labels: torch.Tensor
    source_indices: torch.Tensor  # positions in the test set (mislabelled), draw order (generated)
    included: torch.Tensor  # bool (m,)
    seed: int
    kind: str = "mislabelled"

    def __len__(self):
        return len(self.labels)

    def record(self) -> dict:
        """What an audit run's ledger says about its canaries (enough to rebuild them and check the draw)."""
        content = (index_fingerprint(self.source_indices) if self.kind == "mislabelled" else
                   content_fingerprint(self.images, self.labels))
        return {"canaries": len(self), "included": int(self.included.sum()), "seed": self.seed,
                "source": CANARY_SOURCE if self.kind == "mislabelled" else "starting generator",
                "kind": CANARY_DESCRIPTIONS[self.kind], "canary_kind": self.kind, "canary_fingerprint": content,
                "included_fingerprint": index_fingerprint(torch.nonzero(self.included).flatten())}


def content_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """Short hash of the canaries' bytes: images and labels."""
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    digest.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def canary_generator(seed: int, purpose: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + CANARY_SEED_OFFSET + purpose)


def inclusion_draw(count: int, seed: int) -> torch.Tensor:
    """Independent Bernoulli(1/2) inclusions, deterministic from the seed."""
    return torch.rand(count, generator=canary_generator(seed, 2)) < 0.5


def make_canaries(test: ImageSplit, settings: AuditSettings) -> Canaries:
    """`settings.canaries` test images with seeded wrong labels and a seeded inclusion draw."""
    if test.split != CANARY_SOURCE:
        raise ValueError(f"canaries come from the {CANARY_SOURCE} split, not {test.split!r}")
    if not 2 <= settings.canaries <= len(test):
        raise UserError(f"--audit-canaries {settings.canaries} must be between 2 and the test set's {len(test)}")
    chosen = torch.randperm(len(test), generator=canary_generator(settings.seed, 0))[:settings.canaries]
    classes = int(test.labels.max()) + 1
    offsets = torch.randint(1, classes, (settings.canaries,), generator=canary_generator(settings.seed, 1))
    true_labels = test.labels[chosen]
    return Canaries(test.images[chosen], (true_labels + offsets) % classes, true_labels, test.indices[chosen],
                    inclusion_draw(settings.canaries, settings.seed), settings.seed)


@torch.no_grad()
def generated_canaries(G, settings: AuditSettings, batch_size: int, image_dims: int = 3) -> Canaries:
    """`settings.canaries` samples of the starting generator `G`, each labelled with its class: seeded latents and
    labels, G in training mode on a copy (its BatchNorm statistics untouched) in batches of `batch_size`, as the
    fakes D sees; uint8 with `image_dims` dimensions per batch (3: (m, H, W), the layout of a grey split)."""
    rng = canary_generator(settings.seed, 3)
    z = torch.randn(settings.canaries, G.nz, generator=rng)
    labels = torch.randint(0, G.num_classes, (settings.canaries,), generator=rng)
    G = copy.deepcopy(G).cpu().train()
    fakes = torch.cat([G(z[i:i + batch_size], labels[i:i + batch_size])
                       for i in range(0, settings.canaries, batch_size)])
    images = torch.from_numpy(encode_images(fakes, "uint8"))  # the distillation set's rounding
    if image_dims == 3:
        images = images.squeeze(1)
    return Canaries(images, labels, labels.clone(), torch.arange(settings.canaries),
                    inclusion_draw(settings.canaries, settings.seed), settings.seed, "generated")


def save_canaries(run_dir: str, canaries: Canaries) -> str:
    path = os.path.join(run_dir, CANARY_FILE)
    torch.save({"images": canaries.images, "labels": canaries.labels, "true_labels": canaries.true_labels,
                "source_indices": canaries.source_indices, "included": canaries.included, "seed": canaries.seed,
                "kind": canaries.kind}, path)
    return path


def load_canaries(run_dir: str, record: dict) -> Canaries:
    """An audit run's stored canaries, refused unless they are the ones its ledger records."""
    path = os.path.join(run_dir, CANARY_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{run_dir}: no {CANARY_FILE} (an audit run writes its canaries there)")
    canaries = Canaries(**torch.load(path, weights_only=True))
    mismatch = sorted(key for key, value in canaries.record().items() if record.get(key) != value)
    if mismatch or not torch.equal(canaries.included, inclusion_draw(len(canaries), canaries.seed)):
        raise UserError(f"{path}: these canaries are not the ones the ledger records (differ in "
                        f"{', '.join(mismatch) or 'the inclusion draw'})")
    return canaries


def audit_split(private: ImageSplit, canaries: Canaries) -> ImageSplit:
    """The private split (or its seeded subset) with the included canaries appended. Its `indices` (and so its
    fingerprint) stay the private partition's, which the ledger's guarantee names; the canaries are recorded in
    the ledger instead, and a subset in `subset` as before."""
    if private.split != "private":
        raise ValueError(f"canaries go into the private split, not {private.split!r}")
    keep = canaries.included
    return replace(private, images=torch.cat([private.images, canaries.images[keep]]),
                   labels=torch.cat([private.labels, canaries.labels[keep]]), split="private+canaries",
                   partition={**private.partition, "audit": canaries.record()})


# ---------------------------------------------------------------- attack scores (higher = more likely a member)

@torch.no_grad()
def nearest_distances(candidates: torch.Tensor, reference: torch.Tensor, candidate_labels=None,
                      reference_labels=None, chunk: int = 500) -> torch.Tensor:
    """L2 distance from each candidate to its nearest reference image (of the same label when labels given)."""
    reference = reference.reshape(len(reference), -1).float()
    out = []
    for i in range(0, len(candidates), chunk):
        distances = torch.cdist(candidates[i:i + chunk].reshape(-1, reference.shape[1]).float(), reference)
        if candidate_labels is not None:
            mismatch = candidate_labels[i:i + chunk, None] != reference_labels[None, :]
            distances = distances.masked_fill(mismatch, float("inf"))
        out.append(distances.min(dim=1).values)
    return torch.cat(out)


@torch.no_grad()
def label_logits(D, canaries: Canaries, device="cpu", batch_size: int = 500) -> np.ndarray:
    """D's logit on every canary image under every label: (m, classes), D in eval mode."""
    D.eval()
    out = []
    for i in range(0, len(canaries), batch_size):
        images = to_unit_range(canaries.images[i:i + batch_size]).to(device)
        per_label = [D(images, torch.full((len(images),), label, dtype=torch.long, device=device)).float().cpu()
                     for label in range(D.num_classes)]
        out.append(torch.stack(per_label, dim=1))
    return torch.cat(out).numpy().astype(np.float64)


def discriminator_scores(D, canaries: Canaries, reference_D=None, device="cpu", label_control: bool = True,
                         batch_size: int = 500) -> np.ndarray:
    """White-box: D's logit on each (canary, wrong label), minus `reference_D`'s (the starting point) if given.

    With `label_control`, minus the same change on the canary's image under the labels it was not inserted with
    (all but its true and its wrong label): training moves D's logit on an image whatever the label, and that
    drift, the same for members and non-members, would drown what inserting the pair itself did."""
    change = label_logits(D, canaries, device, batch_size)
    if reference_D is not None:
        change = change - label_logits(reference_D, canaries, device, batch_size)
    rows = np.arange(len(canaries))
    wrong, true = canaries.labels.numpy(), canaries.true_labels.numpy()
    scores = change[rows, wrong]
    if not label_control:
        return scores
    others = np.ones_like(change, dtype=bool)
    others[rows, wrong] = others[rows, true] = False
    return scores - (change * others).sum(axis=1) / others.sum(axis=1)


def generator_scores(canaries: Canaries, generated: torch.Tensor, generated_labels: torch.Tensor) -> np.ndarray:
    """Black-box: minus the distance of each canary to its nearest generated sample of the canary's label."""
    distances = nearest_distances(to_unit_range(canaries.images), generated, canaries.labels, generated_labels)
    return -distances.numpy().astype(np.float64)


# ---------------------------------------------------------------- guesses and the bound

def guesses(scores, k_plus: int, k_minus: int) -> np.ndarray:
    """+1 ("in") on the k+ highest scores, -1 ("out") on the k- lowest, 0 (abstain) elsewhere; ties by position."""
    scores = np.asarray(scores, np.float64)
    if min(k_plus, k_minus) < 0 or k_plus + k_minus > len(scores):
        raise ValueError(f"{k_plus} + {k_minus} guesses need at least as many scores, got {len(scores)}")
    order = np.argsort(-scores, kind="stable")
    out = np.zeros(len(scores), np.int8)
    out[order[:k_plus]], out[order[len(scores) - k_minus:]] = 1, -1
    return out


def count_correct(scores, included, k_plus: int, k_minus: int) -> tuple:
    """(r, v): the number of guesses (k+ + k-) and of correct ones."""
    guess = guesses(scores, k_plus, k_minus)
    truth = np.where(np.asarray(included, bool), 1, -1)
    return int(np.count_nonzero(guess)), int(np.sum(guess == truth))


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Theorem 3.1's bound on P[>= v correct of r guesses] for an (eps, delta)-DP run with m canaries:
    P[Binomial(r, q) >= v] + 2 m delta max_{1<=i<=v} P[v > Binomial(r, q) >= v - i] / i, q = e^eps/(1+e^eps)."""
    if not 0 <= v <= r <= m or eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need 0 <= v <= r <= m, eps >= 0, delta in [0, 1]: m={m} r={r} v={v} eps={eps} "
                         f"delta={delta}")
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = scipy.stats.binom.sf(v - 1, r, q)
    alpha = 0.0
    if delta > 0 and v > 0:
        below = np.cumsum(scipy.stats.binom.pmf(v - np.arange(1, v + 1), r, q))  # P[v > Bin >= v - i]
        alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, float(beta + alpha * delta * 2 * m))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float = SIGNIFICANCE,
                        tolerance: float = 1e-6) -> float:
    """Algorithm 2: the largest eps whose (eps, delta)-DP null gives v correct guesses a p-value below
    `significance` (bisection on eps, the p-value growing with eps); 0 when even eps = 0 is not rejected."""
    if p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < significance:
        low, high = high, 2 * high
        if high > 1e3:  # numerically certain: q is 1 in floating point long before this
            return low
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < significance else (low, middle)
    return low


# ---------------------------------------------------------------- attack AUC with an interval

def rank_auc(positive_scores, negative_scores) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie): the Mann-Whitney U statistic / (n1 n2)."""
    positive = np.asarray(positive_scores, np.float64).ravel()
    negative = np.asarray(negative_scores, np.float64).ravel()
    if not len(positive) or not len(negative):
        raise ValueError("rank_auc needs at least one positive and one negative score")
    _, inverse, counts = np.unique(np.concatenate([positive, negative]), return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank of each distinct value, ties averaged
    ranks = average_rank[inverse.ravel()]
    n1, n2 = len(positive), len(negative)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n2))


def auc_interval(member_scores, nonmember_scores, level: float = 0.95) -> tuple:
    """(AUC, low, high): the rank AUC and Hanley & McNeil's (1982) normal interval, clipped to [0, 1]."""
    auc = rank_auc(member_scores, nonmember_scores)
    n1, n2 = len(member_scores), len(nonmember_scores)
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    variance = (auc * (1 - auc) + (n1 - 1) * (q1 - auc ** 2) + (n2 - 1) * (q2 - auc ** 2)) / (n1 * n2)
    half = scipy.stats.norm.ppf(0.5 + level / 2) * math.sqrt(max(variance, 0.0))
    return auc, max(0.0, auc - half), min(1.0, auc + half)


# ---------------------------------------------------------------- one attack's audit

@dataclass
class AttackResult:
    attack: str
    canaries: int  # m
    members: int
    k_plus: int  # "in" guesses on the highest scores, of the best plan tried
    k_minus: int  # "out" guesses on the lowest scores
    guesses: int  # r = k+ + k-
    correct: int  # v
    epsilon_lower_bound: float
    auc: float
    auc_low: float
    auc_high: float
    per_plan: list = field(default_factory=list)  # {k_plus, k_minus, guesses, correct, epsilon_lower_bound} each

    def as_dict(self) -> dict:
        return dict(vars(self))


def audit_attack(attack: str, scores, included, delta: float, settings: AuditSettings) -> AttackResult:
    """Guesses by every (k+, k-) fixed in advance, each bound at significance / (number of plans); the best
    plan reported (the smallest r among equal bounds)."""
    scores, included = np.asarray(scores, np.float64), np.asarray(included, bool)
    if len(scores) != len(included) or included.all() or not included.any():
        raise ValueError("an audit needs one score per canary and both members and non-members")
    m, plans = len(scores), settings.guess_plans()
    per_plan = []
    for k_plus, k_minus in plans:
        r, v = count_correct(scores, included, k_plus, k_minus)
        bound = epsilon_lower_bound(m, r, v, delta, settings.significance / len(plans))
        per_plan.append({"k_plus": k_plus, "k_minus": k_minus, "guesses": r, "correct": v,
                         "epsilon_lower_bound": bound})
    best = max(per_plan, key=lambda row: (row["epsilon_lower_bound"], -row["guesses"]))
    auc, low, high = auc_interval(scores[included], scores[~included])
    return AttackResult(attack, m, int(included.sum()), best["k_plus"], best["k_minus"], best["guesses"],
                        best["correct"], best["epsilon_lower_bound"], auc, low, high, per_plan)


class AuditFailure(RuntimeError):
    """An empirical lower bound above the claimed epsilon: the DP implementation or its accounting is wrong."""


def check_claim(claimed_epsilon: float, results) -> None:
    """Raise AuditFailure when any attack's lower bound exceeds the claimed epsilon (infinite claims pass)."""
    broken = [r for r in results if r.epsilon_lower_bound > claimed_epsilon]
    if broken:
        detail = "; ".join(f"{r.attack}: {r.epsilon_lower_bound:.3f} ({r.correct} of {r.guesses} guesses correct)"
                           for r in broken)
        raise AuditFailure(f"AUDIT FAILED: the empirical lower bound exceeds the claimed epsilon "
                           f"{claimed_epsilon:.3f} ({detail}); the run is not as private as its ledger says")


# ---------------------------------------------------------------- reports

def format_epsilon(value) -> str:
    return "∞ (no DP)" if value == "inf" or value == math.inf else f"{value:.2f}"


def audit_markdown(rows) -> str:
    """One table: a row per (run, attack) from `run_rows`, with the claimed epsilon beside the lower bound."""
    lines = ["| run | claimed epsilon | attack | epsilon lower bound (95%) | AUC [95% CI] | m | members | k+ / k- | "
             "correct / guesses |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['run']} | {format_epsilon(row['claimed_epsilon'])} | {row['attack']} | "
                     f"{row['epsilon_lower_bound']:.3f} | {row['auc']:.3f} [{row['auc_low']:.3f}, "
                     f"{row['auc_high']:.3f}] | {row['canaries']} | {row['members']} | {row['k_plus']} / "
                     f"{row['k_minus']} | {row['correct']} / {row['guesses']} |")
    return "\n".join(lines) + "\n"


def run_rows(run: str, claimed_epsilon: float, results) -> list:
    """Flat rows (audit.json, the table) for one audited run; an infinite claim is the string "inf" (JSON)."""
    claim = "inf" if math.isinf(claimed_epsilon) else claimed_epsilon
    return [{"run": run, "claimed_epsilon": claim, **result.as_dict()} for result in results]


def plot_scores(runs: dict, path: str):
    """`audit.png`: a row per run (name -> (scores by attack, included)), a panel per attack, each with the
    histograms of the members' and the non-members' scores."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = max(len(scores) for scores, _ in runs.values())
    fig, axes = plt.subplots(len(runs), columns, figsize=(5.5 * columns, 3.6 * len(runs)), squeeze=False)
    for row, (run, (scores, included)) in zip(axes, runs.items()):
        included = np.asarray(included, bool)
        for ax, (attack, values) in zip(row, scores.items()):
            values = np.asarray(values, np.float64)
            bins = np.histogram_bin_edges(values, bins=40)
            ax.hist(values[~included], bins=bins, alpha=0.6, label=f"non-members ({int((~included).sum())})")
            ax.hist(values[included], bins=bins, alpha=0.6, label=f"members ({int(included.sum())})")
            ax.set_title(f"{run}: {attack}")
            ax.set_xlabel("score (higher: guessed member)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
