"""The privacy ledger carried in every checkpoint (DESIGN section 4).

The guarantee is (epsilon, delta)-DP, add/remove-one adjacency, with respect to one private split, named by its
fingerprint. The ledger lists every DP mechanism applied to that split (sigma, sample rate q, steps, clipping
norm C) and every stage that read it WITHOUT DP. `epsilon` composes all mechanisms with one Opacus accountant;
a single non-DP read makes the total infinite. A stage copies its parent's ledger and appends to it; reading a
disjoint public split, or only generator outputs, is post-processing and appends nothing to the mechanisms.
"""
import copy
import math
import sys

from utils.cli import UserError

ACCOUNTANTS = ("prv", "rdp")
SECURE_RNG_NOTE = ("Noise drawn with torch's default (non-cryptographic) generator: Opacus's secure_mode needs "
                   "torchcsprng, which does not build for current torch.")


def new_ledger(partition_info: dict) -> dict:
    """An empty ledger for the private partition described by `ImageSplit.partition`."""
    return {**partition_info, "mechanisms": [], "non_dp_reads": [], "public_data": []}


def inherit(parent_ledger: dict) -> dict:
    return copy.deepcopy(parent_ledger)


def record_data_read(ledger: dict, stage: str, split: str, size: int, run: str = None):
    """Note that `stage` trained on `split` without DP: private/all reads break the guarantee."""
    entry = {"stage": stage, "split": split, "size": int(size), "run": run}
    if split in ("private", "all"):
        ledger["non_dp_reads"].append(entry)
    if split in ("public", "all"):
        ledger["public_data"].append(entry)


def record_mechanism(ledger: dict, stage: str, noise_multiplier: float, sample_rate: float, steps: int,
                     max_grad_norm: float, accountant: str, run: str = None) -> dict:
    """Append (or, on resume, extend) this stage's DP-SGD mechanism on the private split."""
    for mechanism in ledger["mechanisms"]:
        if mechanism["run"] == run and run is not None and mechanism["stage"] == stage:
            mechanism["steps"] = int(steps)
            return mechanism
    mechanism = {"stage": stage, "run": run, "noise_multiplier": float(noise_multiplier),
                 "sample_rate": float(sample_rate), "steps": int(steps), "max_grad_norm": float(max_grad_norm),
                 "accountant": accountant}
    ledger["mechanisms"].append(mechanism)
    return mechanism


def history(ledger: dict) -> list:
    """The mechanisms as Opacus accountant history: [(noise_multiplier, sample_rate, steps), ...]."""
    return [(m["noise_multiplier"], m["sample_rate"], m["steps"]) for m in ledger["mechanisms"] if m["steps"] > 0]


def make_accountant(name: str, accountant_history=()):
    from opacus.accountants import PRVAccountant, RDPAccountant
    if name not in ACCOUNTANTS:
        raise UserError(f"unknown accountant {name!r}: choose from {', '.join(ACCOUNTANTS)}")
    accountant = PRVAccountant() if name == "prv" else RDPAccountant()
    accountant.history = list(accountant_history)
    return accountant


def compose_epsilon(accountant_history, delta: float, accountant: str = "prv") -> float:
    """Epsilon of a list of (sigma, q, steps) mechanisms composed by one accountant; 0 for an empty list."""
    if not accountant_history:
        return 0.0
    return float(make_accountant(accountant, accountant_history).get_epsilon(delta))


def epsilon(ledger: dict, delta: float, accountant: str = "prv") -> float:
    """Total epsilon of everything the ledger records: infinite after any non-DP read of the private split."""
    if ledger["non_dp_reads"]:
        return math.inf
    return compose_epsilon(history(ledger), delta, accountant)


def calibrate_noise(prefix_history, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "prv", tolerance: float = 0.01) -> float:
    """Smallest noise multiplier (to `tolerance` in epsilon) such that prefix + this mechanism <= target."""
    already = compose_epsilon(prefix_history, delta, accountant)
    if already >= target_epsilon:
        raise UserError(f"--target-epsilon {target_epsilon} is already spent: the earlier stages' epsilon is "
                        f"{already:.3f} (delta={delta}); choose a larger total target")

    cache = {}

    def total(sigma):
        if sigma not in cache:
            cache[sigma] = compose_epsilon(list(prefix_history) + [(sigma, sample_rate, steps)], delta, accountant)
        return cache[sigma]

    low, high = 0.0, 1.0
    while total(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise UserError(f"no noise multiplier reaches epsilon {target_epsilon} in {steps} steps at q={sample_rate}")
    # bisect: `high` always meets the target; stop once it is within `tolerance` of it or sigma is pinned down
    while total(high) < target_epsilon - tolerance and high - low > 1e-3 * high:
        middle = (low + high) / 2
        if total(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


def check_delta(delta: float, private_size: int):
    if not 0 < delta < 1.0 / private_size:
        raise UserError(f"--delta {delta} must be below 1/N = {1.0 / private_size:.2e} for a private split of "
                        f"{private_size} images")


def check_same_partition(ledger: dict, split) -> None:
    """Refuse to train on a private split other than the one the ledger's guarantee is about."""
    if ledger.get("dataset") != split.dataset or ledger.get("private_fingerprint") != split.fingerprint:
        raise UserError(f"the private split ({split.dataset}, fingerprint {split.fingerprint}) is not the one this "
                        f"model's ledger covers ({ledger.get('dataset')}, {ledger.get('private_fingerprint')}): "
                        f"use the same --dataset, --public-size and --partition-seed as the earlier stages")


def describe(ledger: dict, delta: float, accountant: str = "prv") -> str:
    """One line for logs and reports, plain about an infinite epsilon."""
    if ledger["non_dp_reads"]:
        stages = ", ".join(f"{r['stage']} ({r['split']} split)" for r in ledger["non_dp_reads"])
        return (f"epsilon = inf: NO differential-privacy guarantee, because {stages} read the private split "
                f"without DP")
    if not ledger["mechanisms"]:
        return "epsilon = 0: the private split has not been read"
    return f"epsilon = {epsilon(ledger, delta, accountant):.3f} at delta = {delta:g} ({accountant.upper()} accountant)"


def warn_if_not_private(ledger: dict):
    """The plain warning every script prints (on stderr) when it loads a model with an infinite epsilon."""
    if ledger["non_dp_reads"]:
        print("WARNING: " + describe(ledger, 1e-5), file=sys.stderr)
