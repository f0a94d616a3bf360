"""The privacy ledger (utils/privacy/ledger.py): composition equals Opacus's own accountants, non-DP reads make epsilon
infinite and say so, calibration meets a total target with the history as a prefix, and refusals."""
import math

import pytest

from utils.privacy.ledger import (calibrate_noise, check_delta, compose_epsilon, describe, epsilon, history, inherit,
                                  is_private, new_ledger, record_data_read, record_mechanism, warn_if_not_private)
from utils.run.cli import UserError

DELTA = 1e-5
PARTITION = {"dataset": "fashion-mnist", "private_fingerprint": "abc", "private_size": 400, "public_size": 200,
             "partition_seed": 0}
TEACHER = ("teacher", 1.1, 0.05, 40)  # stage, sigma, q, steps
FINE_TUNE = ("private", 0.8, 0.08, 25)


def two_stage_ledger(accountant="rdp") -> dict:
    ledger = new_ledger(PARTITION)
    for i, (stage, sigma, q, steps) in enumerate((TEACHER, FINE_TUNE)):
        record_mechanism(ledger, stage, sigma, q, steps, 1.0, accountant, run=f"0000{i}-x")
    return ledger


def opacus_epsilon(accountant_class, mechanisms) -> float:
    """Opacus's accountant stepped through the history one DP step at a time, as the optimizer hook does."""
    accountant = accountant_class()
    for _, sigma, q, steps in mechanisms:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(DELTA)


def test_two_stage_epsilon_equals_opacus_rdp():
    from opacus.accountants import RDPAccountant
    expected = opacus_epsilon(RDPAccountant, (TEACHER, FINE_TUNE))
    assert epsilon(two_stage_ledger(), DELTA, "rdp") == pytest.approx(expected, rel=1e-9)
    assert expected > compose_epsilon([TEACHER[1:]], DELTA, "rdp")  # composition spends more than one stage


def test_two_stage_epsilon_equals_opacus_prv():
    from opacus.accountants import PRVAccountant
    expected = opacus_epsilon(PRVAccountant, (TEACHER, FINE_TUNE))
    assert epsilon(two_stage_ledger("prv"), DELTA, "prv") == pytest.approx(expected, rel=1e-6)


def test_non_dp_read_is_infinite_and_says_so(capsys):
    ledger = two_stage_ledger()
    record_data_read(ledger, "teacher", "private", 400, run="00002-y")
    assert not is_private(ledger)
    assert epsilon(ledger, DELTA, "rdp") == math.inf and epsilon(ledger, DELTA, "prv") == math.inf
    warn_if_not_private(ledger)
    err = capsys.readouterr().err
    assert err.startswith("WARNING: epsilon = inf: NO differential-privacy guarantee")
    assert "teacher (private split) read the private split without DP" in err
    assert describe(ledger, DELTA, "rdp") in err


def test_public_read_appends_no_mechanism_and_no_warning(capsys):
    ledger = new_ledger(PARTITION)
    record_data_read(ledger, "teacher", "public", 200)
    assert ledger["mechanisms"] == [] and ledger["non_dp_reads"] == [] and len(ledger["public_data"]) == 1
    assert epsilon(ledger, DELTA, "rdp") == 0.0
    warn_if_not_private(ledger)
    assert capsys.readouterr().err == ""


def test_record_mechanism_extends_on_resume_and_inherit_copies():
    ledger = new_ledger(PARTITION)
    record_mechanism(ledger, "private", 1.0, 0.1, 5, 1.0, "rdp", run="00000-a")
    record_mechanism(ledger, "private", 1.0, 0.1, 9, 1.0, "rdp", run="00000-a")
    assert history(ledger) == [(1.0, 0.1, 9)]
    child = inherit(ledger)
    record_mechanism(child, "private", 2.0, 0.1, 3, 1.0, "rdp", run="00001-b")
    assert len(child["mechanisms"]) == 2 and len(ledger["mechanisms"]) == 1


def test_calibration_meets_total_target_with_prefix():
    prefix = [TEACHER[1:]]
    sigma = calibrate_noise(prefix, 6.0, DELTA, 0.08, 25, "rdp")
    total = compose_epsilon(prefix + [(sigma, 0.08, 25)], DELTA, "rdp")
    assert 6.0 - 0.02 <= total <= 6.0
    alone = calibrate_noise([], 6.0, DELTA, 0.08, 25, "rdp")
    assert alone < sigma  # the prefix leaves less budget: more noise


def test_spent_target_refused_naming_current_epsilon():
    spent = compose_epsilon([TEACHER[1:]], DELTA, "rdp")
    with pytest.raises(UserError, match=f"already spent: the earlier stages' epsilon is {spent:.3f}"):
        calibrate_noise([TEACHER[1:]], spent * 0.9, DELTA, 0.08, 25, "rdp")


def test_delta_must_be_below_one_over_n():
    check_delta(1e-5, 400)
    for bad in (1 / 400, 0.01, 0.0):
        with pytest.raises(UserError, match="must be below 1/N"):
            check_delta(bad, 400)
