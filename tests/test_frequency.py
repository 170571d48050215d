"""FrequencyEstimator: hand-worked updates, accuracy on a known stream, checkpoints and hash stability."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from trainer.frequency import FrequencyEstimator


def _gap_and_last(est: FrequencyEstimator, key: str) -> tuple[np.ndarray, np.ndarray]:
    """B and A of ``key`` under each hash function, read through the public state_dict and buckets."""
    state = est.state_dict()
    rows = np.arange(est.num_hashes)
    cols = est.buckets([key])[:, 0]
    return state["mean_gap"][rows, cols], state["last_step"][rows, cols]


def test_three_steps_worked_by_hand() -> None:
    est = FrequencyEstimator(num_buckets=1 << 16, num_hashes=2, alpha=0.5)
    bx, by = est.buckets(["x"]), est.buckets(["y"])
    assert not np.any(bx == by)  # no collision, so x and y can be followed separately

    # Step 1, batch [x]. A starts at 0, so the first gap is 1 - 0 = 1 and seeds B: B_x = 1, A_x = 1.
    est.update(["x"])
    gap, last = _gap_and_last(est, "x")
    assert gap.tolist() == [1.0, 1.0] and last.tolist() == [1, 1]
    assert est.probability(["x"]).tolist() == [1.0]

    # Step 2, batch [x, y, x]. x: gap 2 - 1 = 1, B_x = 0.5 * 1 + 0.5 * 1 = 1 (the duplicate x is one sighting;
    # counting it twice would add a gap of 0 and give B_x = 0.5). y: first gap 2 - 0 = 2 seeds B_y = 2.
    est.update(["x", "y", "x"])
    assert _gap_and_last(est, "x")[0].tolist() == [1.0, 1.0]
    gap, last = _gap_and_last(est, "y")
    assert gap.tolist() == [2.0, 2.0] and last.tolist() == [2, 2]

    # Step 4 (step 3 had no x or y), batch [x]. x: gap 4 - 2 = 2, B_x = 0.5 * 1 + 0.5 * 2 = 1.5, A_x = 4.
    est.update(["x"], step=4)
    gap, last = _gap_and_last(est, "x")
    assert gap.tolist() == [1.5, 1.5] and last.tolist() == [4, 4]
    assert est.step == 4
    # p_hat = 1 / B: x -> 1 / 1.5, y -> 1 / 2 (y untouched at step 4).
    np.testing.assert_allclose(est.probability(["x", "y"]), [1 / 1.5, 0.5])
    np.testing.assert_allclose(est.log_q(["x", "y"]), np.log([1 / 1.5, 0.5]))


def test_from_second_sighting_worked_by_hand() -> None:
    """An item first seen late is not charged the whole wait since the stream began."""
    est = FrequencyEstimator(num_buckets=1 << 16, num_hashes=2, alpha=0.5, from_second_sighting=True)
    late = FrequencyEstimator(num_buckets=1 << 16, num_hashes=2, alpha=0.5)  # the default rule, for contrast
    for step in range(1, 1001):  # a long-running stream of other items
        est.update(["other"], step=step)
        late.update(["other"], step=step)
    # Step 1001: "new" appears for the first time. The default rule seeds B = 1001 - 0 (p = 1/1001); here only
    # A = 1001 is recorded, B stays 0 ("seen once"), and its gap counts as max(1, 1001 - 1001) = 1: p = 1.
    est.update(["new"], step=1001)
    late.update(["new"], step=1001)
    gap, last = _gap_and_last(est, "new")
    assert gap.tolist() == [0.0, 0.0] and last.tolist() == [1001, 1001]
    assert est.probability(["new"]).tolist() == [1.0]
    np.testing.assert_allclose(late.probability(["new"]), [1 / 1001])
    # Steps 1002-1004 without it: its gap so far is 1004 - 1001 = 3, p = 1/3.
    est.update([], step=1004)
    np.testing.assert_allclose(est.probability(["new"]), [1 / 3])
    # Step 1005: the second sighting seeds B with the genuine gap 1005 - 1001 = 4 (no moving average yet).
    est.update(["new"], step=1005)
    gap, last = _gap_and_last(est, "new")
    assert gap.tolist() == [4.0, 4.0] and last.tolist() == [1005, 1005]
    np.testing.assert_allclose(est.probability(["new"]), [1 / 4])
    # Step 1007: gap 2, B = 0.5 * 4 + 0.5 * 2 = 3; the default rule is still at 0.5 * (0.5 * 1001 + 0.5 * 4) + 1.
    est.update(["new"], step=1007)
    late.update(["new"], step=1005)
    late.update(["new"], step=1007)
    np.testing.assert_allclose(est.probability(["new"]), [1 / 3])
    np.testing.assert_allclose(late.probability(["new"]), [1 / (0.5 * (0.5 * 1001 + 0.5 * 4) + 0.5 * 2)])
    # Never seen: the floor, as with the default rule.
    assert est.probability(["never"]).tolist() == [est.min_probability]
    # A state saved by either rule loads into the other: "seen once" is B == 0 with A > 0.
    other = FrequencyEstimator(num_buckets=1 << 16, num_hashes=2, alpha=0.5, from_second_sighting=True)
    other.load_state_dict(late.state_dict())
    np.testing.assert_allclose(other.probability(["new", "other"]), late.probability(["new", "other"]))


def test_steps_must_increase_and_auto_increment() -> None:
    est = FrequencyEstimator(num_buckets=1024)
    est.update(["a"], step=5)
    with pytest.raises(ValueError, match="step must increase: got 5 after step 5"):
        est.update(["a"], step=5)
    est.update(["a"])
    assert est.step == 6
    est.update([])  # an empty batch is still a step
    assert est.step == 7


def test_unseen_key_gets_the_floor() -> None:
    est = FrequencyEstimator(num_buckets=1 << 16, min_probability=1e-5)
    assert est.probability(["never"]).tolist() == [1e-5]
    est.update([f"i{k}" for k in range(100)])
    p = est.probability(["never", "i3"])
    assert p.tolist() == [1e-5, 1.0]
    assert est.log_q(["never"])[0] == pytest.approx(np.log(1e-5))


def test_estimates_match_bernoulli_stream_and_follow_drift() -> None:
    # 60 items; item k appears in each batch independently with probability p_k (head 0.5 down to 0.01).
    rng = np.random.default_rng(7)
    true_p = np.geomspace(0.5, 0.01, num=60)
    keys = np.array([f"i{k}" for k in range(60)])
    est = FrequencyEstimator(num_buckets=1 << 14, num_hashes=2, alpha=0.01)
    present = rng.random((30_000, 60)) < true_p
    for row in present:
        est.update(keys[row])
    estimate = est.probability(keys)
    rel_error = np.abs(estimate - true_p) / true_p
    # The EMA averages ~200 gaps, so its relative standard deviation is about sqrt(alpha / 2) = 7%.
    assert rel_error[:20].max() < 0.25  # head, p in [0.5, 0.1]
    assert rel_error[20:45].max() < 0.35  # mid, p in [0.1, 0.02]
    assert np.median(rel_error) < 0.1

    # Item 59 becomes hot (0.01 -> 0.5): the estimate follows within a few hundred sightings.
    for _ in range(2_000):
        est.update(["i59"] if rng.random() < 0.5 else [])
    assert est.probability(["i59"])[0] == pytest.approx(0.5, rel=0.25)


def test_max_over_hashes_discounts_a_collision() -> None:
    est = FrequencyEstimator(num_buckets=64, num_hashes=2, alpha=0.02, seed=3)
    hot = "hot"
    hb = est.buckets([hot])[:, 0]
    # A rare key sharing the hot key's bucket under hash 0 only: hash 1 still sees its own, longer gap.
    rare = next(
        k for k in (f"r{n}" for n in range(10_000)) if (b := est.buckets([k])[:, 0])[0] == hb[0] and b[1] != hb[1]
    )
    rng = np.random.default_rng(0)
    for _ in range(20_000):
        batch = [k for k, p in ((hot, 0.9), (rare, 0.05)) if rng.random() < p]
        est.update(batch)
    # Hash 0 alone would say ~0.9 for the rare key; the largest gap (hash 1) says ~0.05.
    assert est.probability([rare])[0] == pytest.approx(0.05, rel=0.3)
    assert est.probability([hot])[0] == pytest.approx(0.9, rel=0.1)


def test_key_types_hash_consistently() -> None:
    est = FrequencyEstimator(num_buckets=1 << 20)
    as_list = est.buckets(["i1", "i42"])
    np.testing.assert_array_equal(as_list, est.buckets(np.array(["i1", "i42"])))
    np.testing.assert_array_equal(as_list, est.buckets(np.array(["i1", "i42"], dtype=object)))
    ints = est.buckets([1, 42])
    np.testing.assert_array_equal(ints, est.buckets(np.array([1, 42], dtype=np.int32)))
    np.testing.assert_array_equal(ints, est.buckets(np.array([1, 42], dtype=np.uint16)))
    assert ints.shape == (2, 2) and ints.dtype == np.int64
    with pytest.raises(TypeError, match="dtype float64"):
        est.buckets(np.array([1.5]))


def test_hashes_are_pinned() -> None:
    # Changing the hash silently invalidates every saved estimator state; these values must never change.
    est = FrequencyEstimator(num_buckets=1 << 20, num_hashes=2, seed=0)
    assert est.buckets(["i42"])[:, 0].tolist() == [189425, 470529]
    assert est.buckets([42])[:, 0].tolist() == [440766, 985006]


def test_hashes_are_the_same_in_another_process() -> None:
    keys = ["i0", "i42", "user-ü", "x" * 300]
    est = FrequencyEstimator(num_buckets=1 << 20, num_hashes=3, seed=11)
    here = {"str": est.buckets(keys).tolist(), "int": est.buckets([0, -7, 2**62]).tolist()}
    code = (
        "import json, sys\n"
        "from trainer.frequency import FrequencyEstimator\n"
        "est = FrequencyEstimator(num_buckets=1 << 20, num_hashes=3, seed=11)\n"
        f"print(json.dumps({{'str': est.buckets({keys!r}).tolist(), 'int': est.buckets([0, -7, 2**62]).tolist()}}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # Python's own str hash differs in that process
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == here


def test_state_dict_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(1)
    keys = np.arange(200)
    est = FrequencyEstimator(num_buckets=4096, alpha=0.05)
    for _ in range(300):
        est.update(keys[rng.random(200) < 0.1])
    path = tmp_path / "freq.npz"
    np.savez(path, **est.state_dict())
    with np.load(path, allow_pickle=False) as data:
        restored = FrequencyEstimator(num_buckets=4096, alpha=0.05)
        restored.load_state_dict({k: data[k] for k in data.files})
    assert restored.step == est.step == 300
    np.testing.assert_array_equal(restored.probability(keys), est.probability(keys))
    # Both continue identically.
    batch = keys[:50]
    est.update(batch)
    restored.update(batch)
    np.testing.assert_array_equal(restored.probability(keys), est.probability(keys))

    with pytest.raises(ValueError, match=r"\(num_hashes, num_buckets, seed\) = \(2, 4096, 0\)"):
        FrequencyEstimator(num_buckets=4096, seed=1).load_state_dict(est.state_dict())


def test_rescale_to_larger_batches_worked_by_hand_and_on_a_stream() -> None:
    est = FrequencyEstimator(num_buckets=8, num_hashes=1)
    est.update(["a"])  # step 1: a's bucket gets gap 1 (p = 1)
    est.update([])
    est.update([])
    est.update(["b"])  # step 4: b's bucket gets gap 4 (p = 0.25)
    est.rescale_batch(2.0)
    # p = 0.25 in a batch twice as large: 1 - 0.75^2 = 0.4375, gap 1 / 0.4375 = 2.2857...; p = 1 stays 1.
    assert est.probability(["b", "a"]) == pytest.approx([0.4375, 1.0])
    assert est.probability(["never"])[0] == est.min_probability  # unseen stays unseen
    est.rescale_batch(0.5)
    assert est.probability(["b"])[0] == pytest.approx(0.25)  # and back
    with pytest.raises(ValueError, match="ratio"):
        est.rescale_batch(0.0)

    # One estimator follows batches of n examples, another of 2n, from the same item distribution: the first,
    # rescaled by 2, agrees with the second (the nightly job after going from --nproc 2 to 1).
    rng = np.random.default_rng(3)
    weights = 1.0 / np.arange(1, 201) ** 1.1
    weights /= weights.sum()
    keys = np.array([f"i{k}" for k in range(200)])
    small, large = (FrequencyEstimator(num_buckets=1 << 14, alpha=0.01) for _ in range(2))
    for _ in range(20_000):
        small.update(keys[rng.choice(200, size=16, p=weights)])
        large.update(keys[rng.choice(200, size=32, p=weights)])
    before = np.abs(np.log(small.probability(keys[:60]) / large.probability(keys[:60])))
    small.rescale_batch(2.0)
    after = np.abs(np.log(small.probability(keys[:60]) / large.probability(keys[:60])))
    assert np.median(before) > 0.5  # about log 2 for all but the hottest items
    assert np.median(after) < 0.1 and after.max() < 0.35
