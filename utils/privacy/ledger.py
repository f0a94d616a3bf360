"""The privacy ledger carried in every checkpoint (docs/DESIGN.md, "Privacy").

The guarantee is (epsilon, delta)-DP, add/remove-one adjacency, with respect to one private split, named by its
fingerprint. The ledger lists every DP mechanism applied to that split (sigma, sample rate q, steps, clipping
norm C) and every stage that read it WITHOUT DP. `epsilon` composes all mechanisms with one Opacus accountant;
a single non-DP read makes the total infinite. A stage copies its parent's ledger and appends to it; reading a
disjoint public split, or only generator outputs, is post-processing and appends nothing to the mechanisms.
An audit run (utils/privacy/audit.py) trains on the private split plus inserted canaries: its ledger, and that of
anything derived from it, carries an "audits" entry, and such a model is never a released one.
"""
import copy
import math
import sys
import warnings

import numpy as np

from utils.run.cli import UserError
from utils.run.distributed import is_writer

ACCOUNTANTS = ("prv", "rdp")
SECURE_RNG_NOTE = ("Noise drawn with torch's default (non-cryptographic) generator: Opacus's secure_mode needs "
                   "torchcsprng, which does not build for current torch.")


def new_ledger(partition_info: dict) -> dict:
    """An empty ledger for the private partition described by `ImageSplit.partition`."""
    return {**partition_info, "mechanisms": [], "non_dp_reads": [], "public_data": []}


def inherit(parent_ledger: dict) -> dict:
    return copy.deepcopy(parent_ledger)


def record_data_read(ledger: dict, stage: str, split: str, size: int, run: str = None, subset: dict = None):
    """Note that `stage` trained on `split` without DP: private/all reads break the guarantee. `subset`: the
    seeded subset it read instead of the whole split (`utils.data.datasets.seeded_subset`'s record)."""
    entry = {"stage": stage, "split": split, "size": int(size), "run": run}
    if subset:
        entry["subset"] = subset
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


def record_audit(ledger: dict, stage: str, run: str, canaries: dict) -> dict:
    """Mark the ledger as that of an audit run: `stage` trained on the private split plus the canaries described
    by `canaries` (utils.privacy.audit.Canaries.record). Absent from every normal run's ledger."""
    entry = {"stage": stage, "run": run, **canaries}
    ledger.setdefault("audits", []).append(entry)
    return entry


def is_audit(ledger: dict) -> bool:
    """True for an audit run and everything derived from one: canaries were inserted into its private data."""
    return bool(ledger.get("audits"))


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
    """Epsilon of a list of (sigma, q, steps) mechanisms composed by one accountant; 0 for an empty list, infinite
    when a mechanism that took steps had no noise (an audit's control run; PRV cannot take sigma = 0)."""
    if not accountant_history:
        return 0.0
    if any(sigma == 0 and steps > 0 for sigma, _, steps in accountant_history):
        return math.inf
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # PRV's numerics warn far from the target
        warnings.simplefilter("ignore")
        value = float(make_accountant(accountant, accountant_history).get_epsilon(delta))
    return value if not math.isnan(value) else math.inf


def is_private(ledger: dict) -> bool:
    """False after any non-DP read of the private split: the total epsilon is then infinite."""
    return not ledger["non_dp_reads"]


def epsilon(ledger: dict, delta: float, accountant: str = "prv") -> float:
    """Total epsilon of everything the ledger records: infinite after any non-DP read of the private split."""
    if ledger["non_dp_reads"]:
        return math.inf
    return compose_epsilon(history(ledger), delta, accountant)


def calibrate_noise(prefix_history, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "prv", tolerance: float = 0.01) -> float:
    """Smallest noise multiplier (to `tolerance` in epsilon) such that prefix + this mechanism <= target.

    Epsilon falls monotonically with sigma and log(epsilon) is close to linear in log(sigma), so after bracketing
    the target (doubling or halving sigma from 1; for PRV, steps of 15% from the RDP answer) a regula falsi on the
    logs (Illinois variant, bisection where epsilon is infinite) needs a handful of accountant evaluations: PRV
    takes seconds per evaluation.
    """
    already = compose_epsilon(prefix_history, delta, accountant)
    if already >= target_epsilon:
        raise UserError(f"--target-epsilon {target_epsilon} is already spent: the earlier stages' epsilon is "
                        f"{already:.3f} (delta={delta}); choose a larger total target")
    cache = {}

    def total(log_sigma):
        if log_sigma not in cache:
            mechanism = (math.exp(log_sigma), sample_rate, steps)
            cache[log_sigma] = compose_epsilon(list(prefix_history) + [mechanism], delta, accountant)
        return cache[log_sigma]

    def gap(log_sigma):  # > 0: too little noise
        value = total(log_sigma)
        return math.log(value / target_epsilon) if math.isfinite(value) else math.inf

    start, factor = 0.0, 2.0
    if accountant == "prv":  # bracket around the (fast) RDP answer: PRV is tighter, its sigma a little smaller
        try:
            start, factor = math.log(calibrate_noise(prefix_history, target_epsilon, delta, sample_rate, steps,
                                                     "rdp", tolerance)), 1.15
        except UserError:  # RDP cannot reach some small targets that PRV can
            pass
    low, high = _bracket(gap, start, math.log(factor), target_epsilon, steps, sample_rate)
    return math.exp(_regula_falsi(gap, low, high, lambda x: total(x) >= target_epsilon - tolerance))


def _regula_falsi(gap, low, high, good_enough) -> float:
    """Shrink [low, high] (gap(low) > 0 >= gap(high)) until `good_enough(high)`; Illinois variant, bisection
    where the gap is infinite. Returns high: its sigma always meets the target."""
    f_low, f_high, side = gap(low), gap(high), 0
    while not good_enough(high) and high - low > 1e-4:
        x = (low * f_high - high * f_low) / (f_high - f_low) if math.isfinite(f_low) else (low + high) / 2
        if not low < x < high:
            x = (low + high) / 2
        f_x = gap(x)
        if f_x > 0:
            low, f_low = x, f_x
            f_high, side = (f_high / 2 if side == -1 else f_high), -1
        else:
            high, f_high = x, f_x
            f_low, side = (f_low / 2 if side == 1 else f_low), 1
    return high


def _bracket(gap, start, step, target_epsilon, steps, sample_rate):
    """(log sigma too small, log sigma meeting the target), `step` apart, searched from `start`."""
    high = start
    while gap(high) > 0:
        high += step
        if high > math.log(1e4):
            raise UserError(f"no noise multiplier reaches epsilon {target_epsilon} in {steps} steps at "
                            f"q={sample_rate}")
    low = high - step
    while gap(low) <= 0:
        low, high = low - step, low
    return low, high


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
    """One line for logs and reports, plain about an infinite epsilon and about an audit run."""
    audit = " (AUDIT run: canaries were inserted into the private split)" if is_audit(ledger) else ""
    if ledger["non_dp_reads"]:
        stages = ", ".join(f"{r['stage']} ({r['split']} split)" for r in ledger["non_dp_reads"])
        return (f"epsilon = inf: NO differential-privacy guarantee, because {stages} read the private split "
                f"without DP" + audit)
    if not ledger["mechanisms"]:
        return "epsilon = 0: the private split has not been read" + audit
    return (f"epsilon = {epsilon(ledger, delta, accountant):.3f} at delta = {delta:g} ({accountant.upper()} "
            f"accountant)" + audit)


def warn_if_not_private(ledger: dict):
    """The plain warning every script prints (on stderr) when it loads a model with an infinite epsilon (rank 0
    alone under torchrun)."""
    if ledger["non_dp_reads"] and is_writer():
        print("WARNING: " + describe(ledger, 1e-5), file=sys.stderr)
