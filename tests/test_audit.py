"""The one-run privacy audit (utils/privacy/audit.py): the bound of Steinke, Nasr & Jagielski (2023) against hand
computations and its shape, the canaries and their seeded inclusion, the attacks, the AUC interval, the claim
check and the audit mark in the ledger."""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from conftest import TINY_PUBLIC, TINY_TEST
from utils.data.datasets import load_split
from utils.privacy.audit import (AuditFailure, AuditSettings, audit_attack, audit_markdown, audit_split, auc_interval,
                                 check_claim, count_correct, discriminator_scores, epsilon_lower_bound,
                                 generator_scores, guesses, inclusion_draw, make_canaries, p_value, plot_scores,
                                 run_rows)
from utils.privacy.ledger import describe, inherit, is_audit, new_ledger, record_audit, record_mechanism


def rr_accuracy(eps: float) -> float:
    return math.exp(eps) / (1 + math.exp(eps))


def hand_p_value(m, r, v, eps, delta) -> float:
    """Theorem 3.1 written out with binomial coefficients (independent of the implementation)."""
    q = rr_accuracy(eps)
    pmf = [math.comb(r, j) * q ** j * (1 - q) ** (r - j) for j in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = max([sum(pmf[v - i:v]) / i for i in range(1, v + 1)], default=0.0)
    return min(1.0, beta + 2 * m * delta * alpha)


# ---------------------------------------------------------------- the bound

def test_p_value_two_guesses_by_hand():
    q = rr_accuracy(1.0)
    alpha = max(2 * q * (1 - q), (2 * q * (1 - q) + (1 - q) ** 2) / 2)  # i = 1, i = 2
    assert p_value(2, 2, 2, 1.0, 0.0) == pytest.approx(q ** 2, rel=1e-12)
    assert p_value(2, 2, 2, 1.0, 0.01) == pytest.approx(q ** 2 + 4 * 0.01 * alpha, rel=1e-12)


@pytest.mark.parametrize("m,r,v,eps,delta", [(10, 10, 10, 0.7, 1e-3), (50, 20, 15, 1.3, 1e-4), (7, 6, 2, 0.2, 0.05)])
def test_p_value_matches_the_formula(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(hand_p_value(m, r, v, eps, delta), rel=1e-10)


def test_all_ten_guesses_right_without_delta_gives_the_closed_form():
    # P[Bin(10, q) >= 10] = q^10 = 0.05  <=>  q = 0.05^(1/10), eps = log(q / (1 - q)) = 1.0518...
    q = 0.05 ** 0.1
    assert epsilon_lower_bound(10, 10, 10, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)


def test_bound_with_delta_is_where_the_hand_p_value_crosses_the_significance():
    m, r, v, delta = 100, 40, 36, 1e-3
    bound = epsilon_lower_bound(m, r, v, delta)
    assert 0 < bound < epsilon_lower_bound(m, r, v, 0.0)  # delta costs
    assert hand_p_value(m, r, v, bound - 1e-4, delta) < 0.05 <= hand_p_value(m, r, v, bound + 1e-4, delta)


def test_bound_grows_with_correct_guesses_and_is_zero_at_chance():
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in range(0, 201)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert bounds[100] == 0.0 and bounds[110] == 0.0  # chance, and within its noise
    assert bounds[200] > bounds[170] > bounds[140] > 0


def test_bound_is_zero_for_scores_that_ignore_membership():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    result = audit_attack("random", rng.normal(size=1000), included, 1e-5, AuditSettings(canaries=1000))
    assert result.epsilon_lower_bound == 0.0
    assert result.auc_low < 0.5 < result.auc_high


def test_randomized_response_is_rarely_caught_above_its_epsilon():
    """Guesses from eps-DP randomized response: the 95% lower bound exceeds eps in at most ~5% of the runs, and
    it sits close below eps otherwise (the bound is tight for this mechanism, the paper's section 3)."""
    eps, m = 1.0, 1000
    correct = np.random.default_rng(0).binomial(m, rr_accuracy(eps), size=100)
    bounds = np.array([epsilon_lower_bound(m, m, int(v), 0.0) for v in correct])
    assert np.mean(bounds > eps) <= 0.1
    assert np.median(bounds) > 0.7 * eps


def test_guesses_take_the_k_highest_and_lowest():
    scores = np.array([0.1, 5.0, -3.0, 2.0, 0.0, -1.0])
    assert guesses(scores, 2, 2).tolist() == [0, 1, -1, 1, 0, -1]
    assert guesses(scores, 1, 0).tolist() == [0, 1, 0, 0, 0, 0]
    assert guesses(scores, 0, 3).tolist() == [0, 0, -1, 0, -1, -1]
    assert count_correct(scores, [False, True, False, False, False, True], 2, 2) == (4, 2)
    assert count_correct(scores, [False, True, False, False, False, True], 1, 0) == (1, 1)
    with pytest.raises(ValueError):
        guesses(scores, 4, 3)


def test_guess_plans_are_fixed_fractions_of_m_two_and_one_sided():
    plans = AuditSettings(canaries=1000).guess_plans()
    assert plans == [(k, k_minus) for k in (20, 50, 100, 200, 500) for k_minus in (k, 0)]
    assert AuditSettings(canaries=10).guess_plans() == [(1, 1), (1, 0), (2, 2), (2, 0), (5, 5), (5, 0)]


def test_separable_scores_give_a_positive_bound_and_the_claim_check_raises():
    rng = np.random.default_rng(1)
    included = rng.random(1000) < 0.5
    scores = included + 0.3 * rng.normal(size=1000)
    result = audit_attack("separable", scores, included, 1e-5, AuditSettings(canaries=1000))
    assert result.epsilon_lower_bound > 2 and result.auc > 0.95
    assert result.epsilon_lower_bound == max(row["epsilon_lower_bound"] for row in result.per_plan)
    assert (result.guesses, result.correct) == count_correct(scores, included, result.k_plus, result.k_minus)
    # the reported plan's bound is computed at significance 0.05 / 10 (Bonferroni over the ten plans)
    assert result.epsilon_lower_bound == pytest.approx(
        epsilon_lower_bound(1000, result.guesses, result.correct, 1e-5, 0.005), abs=1e-9)
    check_claim(math.inf, [result])
    check_claim(result.epsilon_lower_bound + 0.01, [result])
    with pytest.raises(AuditFailure, match="AUDIT FAILED"):
        check_claim(1.0, [result])


# ---------------------------------------------------------------- the AUC interval

def test_auc_interval_contains_the_true_auc():
    # N(1, 1) against N(0, 1): true AUC = Phi(1 / sqrt 2)
    true_auc = scipy.stats.norm.cdf(1 / math.sqrt(2))
    rng = np.random.default_rng(2)
    auc, low, high = auc_interval(rng.normal(1, 1, 500), rng.normal(0, 1, 500))
    assert low < true_auc < high and low < auc < high and high - low < 0.1
    covered = 0
    for _ in range(200):
        _, low, high = auc_interval(rng.normal(1, 1, 200), rng.normal(0, 1, 200))
        covered += low < true_auc < high
    assert covered >= 180  # a 95% interval


def test_auc_interval_shrinks_with_more_canaries():
    rng = np.random.default_rng(3)
    _, low_small, high_small = auc_interval(rng.normal(0.5, 1, 100), rng.normal(0, 1, 100))
    _, low_large, high_large = auc_interval(rng.normal(0.5, 1, 2000), rng.normal(0, 1, 2000))
    assert high_large - low_large < (high_small - low_small) / 3


# ---------------------------------------------------------------- canaries and their inclusion

@pytest.fixture(scope="module")
def splits(tiny_data_root):
    test = load_split("fashion-mnist", "test", tiny_data_root, TINY_PUBLIC)
    private = load_split("fashion-mnist", "private", tiny_data_root, TINY_PUBLIC)
    return test, private


def test_canaries_are_deterministic_from_the_seed_and_mislabelled(splits):
    test, _ = splits
    first, again = make_canaries(test, AuditSettings(100, seed=3)), make_canaries(test, AuditSettings(100, seed=3))
    other = make_canaries(test, AuditSettings(100, seed=4))
    for name in ("images", "labels", "source_indices", "included"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.included, other.included) and not torch.equal(first.labels, other.labels)
    assert (first.labels != first.true_labels).all() and len(set(first.source_indices.tolist())) == 100
    assert torch.equal(first.images, test.images[first.source_indices])
    assert first.record() == again.record() and first.record()["included"] == int(first.included.sum())


def test_generated_canaries_are_the_generators_fakes_seeded_and_labelled_with_their_class():
    from models import Generator
    from utils.privacy.audit import content_fingerprint, generated_canaries
    torch.manual_seed(0)
    G = Generator(channels=(8, 4, 4))
    running_mean = G.block0.norm.running_mean.clone()
    first = generated_canaries(G, AuditSettings(40, seed=3), batch_size=16)
    again = generated_canaries(G, AuditSettings(40, seed=3), batch_size=16)
    other = generated_canaries(G, AuditSettings(40, seed=4), batch_size=16)
    assert first.images.shape == (40, 28, 28) and first.images.dtype == torch.uint8 and first.kind == "generated"
    for name in ("images", "labels", "included"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    assert not torch.equal(first.images, other.images) and torch.equal(first.labels, first.true_labels)
    assert torch.equal(G.block0.norm.running_mean, running_mean)  # G itself is untouched
    z = torch.randn(40, G.nz, generator=torch.Generator().manual_seed(3 + 15485863 + 3))
    G.train()
    with torch.no_grad():  # the first batch of 16, as D sees fakes: training mode, the run's batch size
        expected = torch.round((G(z[:16], first.labels[:16]).clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
    assert torch.equal(first.images[:16], expected.squeeze(1))
    record = first.record()
    assert record["canary_kind"] == "generated" and record["canary_fingerprint"] == content_fingerprint(
        first.images, first.labels) and record != other.record()
    assert generated_canaries(G, AuditSettings(4, seed=3), 4, image_dims=4).images.shape == (4, 1, 28, 28)


def test_about_half_the_canaries_are_included():
    draw = inclusion_draw(20000, seed=0)
    assert abs(draw.float().mean().item() - 0.5) < 0.015  # 4.2 standard deviations
    assert torch.equal(draw, inclusion_draw(20000, seed=0)) and not torch.equal(draw, inclusion_draw(20000, seed=1))


def test_canaries_refuse_other_sources_and_sizes(splits):
    test, private = splits
    with pytest.raises(ValueError):
        make_canaries(private, AuditSettings(10))
    from utils.run.cli import UserError
    with pytest.raises(UserError):
        make_canaries(test, AuditSettings(TINY_TEST + 1))


def test_audit_split_adds_the_included_canaries_and_keeps_the_partition(splits, tiny_data_root):
    test, private = splits
    canaries = make_canaries(test, AuditSettings(60, seed=1))
    split = audit_split(private, canaries)
    included = int(canaries.included.sum())
    assert len(split) == len(private) + included and 0 < included < 60
    assert torch.equal(split.images[len(private):], canaries.images[canaries.included])
    assert torch.equal(split.labels[len(private):], canaries.labels[canaries.included])
    assert torch.equal(split.images[:len(private)], private.images)
    assert split.fingerprint == private.fingerprint  # the ledger's partition is still the private split
    fresh = load_split("fashion-mnist", "private", tiny_data_root, TINY_PUBLIC)  # a normal run is unaffected
    assert fresh.fingerprint == private.fingerprint and len(fresh) == len(private)
    assert split.partition["audit"] == canaries.record() and "audit" not in fresh.partition


def test_audit_ledger_is_marked_and_a_normal_one_is_not(splits):
    test, private = splits
    canaries = make_canaries(test, AuditSettings(40))
    normal = new_ledger(private.partition)
    ledger = inherit(normal)
    record_mechanism(ledger, "private", 1.0, 0.05, 10, 1.0, "rdp", run="00001-audit")
    entry = record_audit(ledger, "private", "00001-audit", canaries.record())
    assert not is_audit(normal) and "audits" not in normal
    assert is_audit(ledger) and is_audit(inherit(ledger)) and entry["included"] == int(canaries.included.sum())
    assert "AUDIT run" in describe(ledger, 1e-5, "rdp") and "AUDIT" not in describe(normal, 1e-5, "rdp")


# ---------------------------------------------------------------- attacks and reports

def test_discriminator_scores_are_logits_relative_to_the_start_and_the_other_labels(splits):
    from models import Discriminator
    test, _ = splits
    canaries = make_canaries(test, AuditSettings(30))
    torch.manual_seed(0)
    D, start = Discriminator(channels=(8, 8)), Discriminator(channels=(8, 8))
    images = canaries.images.float().unsqueeze(1) / 127.5 - 1
    with torch.no_grad():
        table = torch.stack([D(images, torch.full((30,), y)) - start(images, torch.full((30,), y))
                             for y in range(10)], dim=1).numpy()
    raw = discriminator_scores(D, canaries, label_control=False, batch_size=7)
    with torch.no_grad():
        assert np.allclose(raw, D(images, canaries.labels).numpy(), atol=1e-6)
    relative = discriminator_scores(D, canaries, reference_D=start, label_control=False)
    assert np.allclose(relative, table[np.arange(30), canaries.labels], atol=1e-6)
    i, wrong, true = 3, int(canaries.labels[3]), int(canaries.true_labels[3])
    others = [y for y in range(10) if y not in (wrong, true)]
    controlled = discriminator_scores(D, canaries, reference_D=start)
    assert controlled[i] == pytest.approx(table[i, wrong] - table[i, others].mean(), abs=1e-5)
    assert np.allclose(discriminator_scores(D, canaries, reference_D=D), 0.0)


def test_generator_scores_find_a_copied_canary(splits):
    test, _ = splits
    canaries = make_canaries(test, AuditSettings(20))
    generated = torch.rand(50, 1, 28, 28) * 2 - 1
    generated_labels = torch.randint(0, 10, (50,))
    generated[7], generated_labels[7] = canaries.images[4].float() / 127.5 - 1, canaries.labels[4]
    scores = generator_scores(canaries, generated, generated_labels)
    assert scores.shape == (20,) and scores[4] == pytest.approx(0.0, abs=1e-4) and np.argmax(scores) == 4
    generated_labels[7] = (canaries.labels[4] + 1) % 10  # another label: no longer searched
    assert generator_scores(canaries, generated, generated_labels)[4] < -1


def test_reports_table_and_histogram(tmp_path):
    rng = np.random.default_rng(4)
    included = rng.random(200) < 0.5
    scores = {"white-box": included + rng.normal(size=200), "black-box": rng.normal(size=200)}
    results = [audit_attack(name, values, included, 1e-5, AuditSettings(canaries=200))
               for name, values in scores.items()]
    rows = run_rows("audit eps 10", 10.0, results) + run_rows("control", math.inf, results[:1])
    table = audit_markdown(rows)
    assert table.count("\n") == 2 + 3 and "∞ (no DP)" in table and "| white-box |" in table
    assert f"{results[0].correct} / {results[0].guesses}" in table
    assert f"| {results[0].k_plus} / {results[0].k_minus} |" in table
    assert rows[-1]["claimed_epsilon"] == "inf" and rows[0]["claimed_epsilon"] == 10.0
    plot_scores({"audit eps 10": (scores, included), "control": (scores, included)}, str(tmp_path / "audit.png"))
    assert (tmp_path / "audit.png").stat().st_size > 1000


def test_a_signal_only_at_the_top_is_caught_by_one_sided_guesses():
    """As in a short run: 40% of the members were sampled and stand out, the rest look like non-members."""
    rng = np.random.default_rng(5)
    included = rng.random(1000) < 0.5
    seen = included & (rng.random(1000) < 0.4)
    scores = rng.normal(size=1000) + 4.0 * seen
    result = audit_attack("top only", scores, included, 1e-5, AuditSettings(canaries=1000))
    two_sided = [row for row in result.per_plan if row["k_minus"] > 0]
    assert result.k_minus == 0 and result.epsilon_lower_bound > max(row["epsilon_lower_bound"] for row in two_sided)


def test_a_mechanism_without_noise_has_infinite_epsilon():
    from utils.privacy.ledger import compose_epsilon
    for accountant in ("prv", "rdp"):
        assert compose_epsilon([(1.0, 0.01, 10), (0.0, 0.01, 5)], 1e-5, accountant) == math.inf
    assert compose_epsilon([(1.0, 0.01, 10)], 1e-5, "rdp") < math.inf
