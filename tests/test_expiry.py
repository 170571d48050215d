"""Expiring ID rows in the nightly job: activity bookkeeping, compaction that keeps surviving rows bit for bit,
and three nights of ``run_full`` with a time to live."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from streaming.archive import ArchiveWriter
from streaming.events import Click, Impression, Item
from streaming.settings import SettingsError
from tests.full_fixtures import MODEL, full_settings
from trainer.__main__ import main
from trainer.artifact import (
    compute_item_vectors,
    load_id_activity,
    load_training_state,
    load_version,
    save_version,
)
from trainer.dataset import Dataset
from trainer.expiry import IdActivity
from trainer.features import FeatureEncoder, Vocab
from trainer.full import EXIT_PROMOTED, FullResult, FullSettings, run_full
from trainer.model import TwoTowerModel
from trainer.registry import Registry
from trainer.train import TrainConfig
from trainer.warm_state import TrainingState

torch.set_num_threads(1)
DAY_MS = 86_400_000
DAY1_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
DAYS = [dt.date(2024, 1, d) for d in range(1, 5)]
# In-batch negatives only, no SSL: both draw from the catalogue, which expiry changes, so with them a run
# with and one without expiry would differ by more than the dropped rows.
TRAIN = TrainConfig(batch_size=32, frequency_buckets=1 << 10, easy_negatives=0, ssl_weight=0.0)


def _item(name: str, created_ms: int, ts_ms: int | None = None) -> Item:
    return Item(name, "c", ("t",), {"price": 1.0}, created_ms, created_ms if ts_ms is None else ts_ms)


# ------------------------------------------------------------------------------------------ units
def test_vocab_retained_keeps_order_and_reports_old_rows() -> None:
    vocab = Vocab(["a", "b", "c", "d"], max_size=10)  # a=1 b=2 c=3 d=4
    kept, rows = vocab.retained(np.array([True, False, True, False, True]))
    assert kept.tokens == ("b", "d") and kept.index("b") == 1 and kept.index("d") == 2 and kept.index("a") == 0
    assert rows.tolist() == [0, 2, 4] and kept.max_size == 10
    with pytest.raises(ValueError, match="shape"):
        vocab.retained(np.ones(3, dtype=bool))


def test_activity_follows_clicks_records_and_impressions() -> None:
    events = [
        _item("i1", 10),
        _item("i2", 20),
        _item("i3", 50, ts_ms=120),  # updated at 120
        Click("u1", "i1", "r1", 100),
        Click("u2", "i2", "r2", 300),
        Click("u1", "i2", "r3", 200),
        Impression("u2", "i1", "r4", 0, 290),
        Impression("u1", "i1", "r5", 1, 295),
    ]
    dataset = Dataset.from_events(events)
    encoder = FeatureEncoder.fit(dataset, last_n=5)
    activity = IdActivity.uniform(encoder, 0).observed(encoder, dataset)
    users = dict(zip(encoder.user_vocab.tokens, activity.user[1:].tolist(), strict=True))
    items = dict(zip(encoder.item_vocab.tokens, activity.item[1:].tolist(), strict=True))
    assert users == {"u1": 200, "u2": 300}  # each user's newest click
    # i1: clicked at 100, impressed (no time kept) -> the newest click, 300; i2: clicked at 300; i3: record at 120.
    assert items == {"i1": 300, "i2": 300, "i3": 120}
    assert activity.user[0] == activity.item[0] == 0
    # Activity never goes back: an older day observed again leaves the newer times.
    again = activity.observed(encoder, Dataset.from_events([Click("u1", "i1", "r9", 5)]))
    assert again.user.tolist() == activity.user.tolist() and again.item.tolist() == activity.item.tolist()
    live = activity.live(since_ms=250)
    assert live["user"].tolist() == [True, False, True]  # default row, u1 (200) out, u2 (300) in
    assert live["item"].tolist() == [True, True, True, False]


def test_activity_of_a_parent_saved_without_one_and_growth() -> None:
    dataset = Dataset.from_events([_item("i1", 10), Click("u1", "i1", "r1", 100)])
    encoder = FeatureEncoder.fit(dataset, last_n=5)
    uniform = IdActivity.uniform(encoder, 7_000)
    assert uniform.user.tolist() == [0, 7_000] and uniform.item.tolist() == [0, 7_000]
    bigger = encoder.extend(Dataset.from_events([_item("i2", 10), Click("u2", "i2", "r2", 200)]))
    grown = uniform.extended(bigger)
    assert grown.user.tolist() == [0, 7_000, 0] and grown.item.tolist() == [0, 7_000, 0]
    with pytest.raises(ValueError, match="extend it first"):
        uniform.observed(bigger, dataset)


def test_training_state_rows_follow_their_ids() -> None:
    saved = {
        "t.weight": {"step": torch.tensor(5.0), "exp_avg": torch.tensor([[1.0], [2.0], [3.0]])},
        "dense": {"step": torch.tensor(5.0), "exp_avg": torch.tensor([9.0, 8.0])},
    }
    state = TrainingState("Adam", saved, None).take_rows({"t.weight": np.array([0, 2, 4])})
    # Row 4 is an id added after the state was saved: zero moments, like a grown row.
    assert state.optimizer["t.weight"]["exp_avg"].tolist() == [[1.0], [3.0], [0.0]]
    assert float(state.optimizer["t.weight"]["step"]) == 5.0
    assert state.optimizer["dense"]["exp_avg"].tolist() == [9.0, 8.0]


def test_compaction_keeps_surviving_rows_and_drops_the_rest_to_default() -> None:
    events = [_item(f"i{n}", 10) for n in range(6)]
    events += [Click(f"u{k % 4}", f"i{(3 * k) % 6}", f"r{k}", 100 + k) for k in range(24)]
    dataset = Dataset.from_events(events)
    encoder = FeatureEncoder.fit(dataset, last_n=5)
    model = TwoTowerModel(encoder, MODEL)
    torch.manual_seed(0)
    with torch.no_grad():  # distinct rows everywhere, the default rows included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    history = [["i0", "i3"], ["i4"], [], ["i5", "i0"]]
    users = ["u0", "u1", "u2", "u3"]
    before_users = model.user_vectors(encoder.encode_users(users, {}, history)).detach()
    items = [f"i{n}" for n in range(6)]
    before_items = model.item_vectors(encoder.encode_items(items, dataset.items)).detach()
    keep = {
        "user": np.array([encoder.user_vocab.token(k) in {None, "u0", "u3"} for k in range(len(encoder.user_vocab))]),
        "item": np.array([encoder.item_vocab.token(k) != "i4" for k in range(len(encoder.item_vocab))]),
    }
    compact, rows = encoder.retain_ids(keep)
    old_user_table = model.user_tower.id_table.weight.detach().clone()
    model.take_id_rows(compact, rows)
    assert compact.user_vocab.tokens == ("u0", "u3") and "i4" not in compact.item_vocab
    assert model.user_tower.id_table.num_embeddings == 3
    assert model.item_tower.id_table.num_embeddings == len(compact.item_vocab) == 6
    assert model.user_tower.table("last_n").num_embeddings == 6  # numbered by item id too
    assert torch.equal(model.user_tower.id_table.weight[0], old_user_table[0])
    # Kept users, their histories over kept items: bit for bit. u0's history loses nothing; u3's neither.
    after_users = model.user_vectors(compact.encode_users(users, {}, history)).detach()
    assert torch.equal(after_users[0], before_users[0]) and torch.equal(after_users[3], before_users[3])
    # Dropped users now look like an unknown user with the same history (another batch shape: allclose).
    unknown = model.user_vectors(compact.encode_users(["nobody", "nobody"], {}, history[1:3])).detach()
    assert torch.allclose(after_users[1:3], unknown, atol=1e-6)
    assert not torch.allclose(after_users[1:3], before_users[1:3], atol=1e-3)
    after_items = model.item_vectors(compact.encode_items(items, dataset.items)).detach()
    kept_items = [n for n in range(6) if n != 4]
    assert torch.equal(after_items[kept_items], before_items[kept_items])
    assert not torch.equal(after_items[4], before_items[4])  # i4: its features and the default row now
    # The dropped item stays retrievable: a version's vectors cover the catalogue, not only the vocabulary.
    ids, vectors = compute_item_vectors(model, compact, dataset.items)
    assert ids[-1] == "i4" and sorted(ids) == sorted(items)
    assert np.allclose(vectors[-1], after_items[4].numpy(), atol=1e-6)


def test_ttl_setting_is_checked(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="id_ttl_days"):
        FullSettings(id_ttl_days=0.5)
    assert FullSettings(id_ttl_days=1.0).id_ttl_days == 1.0


# ------------------------------------------------------------------------------------------ nights
@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Day 1: items i0..i9, users u0..u9 click i0..i9. Days 2-3: only u0..u4 click, only i0..i7 are clicked.
    Day 4: u5 comes back.

    Clicks are a minute apart; the gate holds back the last 10% of each day (click 90 of 100, 54 of 60). Every
    held-back click is a pair the day's training clicks do not hold, so the gate has something to score: on day 1
    user k mod 10 clicks i(7k mod 10), one item per user, and its held-back click the next item; later, users click
    items of their own parity and the held-back clicks go to the other parity.
    """
    root = tmp_path_factory.mktemp("archive")
    events: list[Item | Click] = [_item(f"i{n}", DAY1_MS) for n in range(10)]
    events += [
        Click(f"u{k % 10}", f"i{(7 * k + (k >= 90)) % 10}", f"a{k}", DAY1_MS + 60_000 * (k + 1)) for k in range(100)
    ]

    def day(index: int, users: int) -> list[Click]:
        start = DAY1_MS + index * DAY_MS
        return [
            Click(
                f"u{k % users}",
                f"i{(2 * (k // users) + k % users % 2 + (k >= 54)) % 8}",
                f"d{index}-{k}",
                start + 60_000 * (k + 1),
            )
            for k in range(60)
        ]

    events += day(1, 5) + day(2, 5) + day(3, 6)
    with ArchiveWriter(root) as writer:
        writer.write(events)
    return root


@pytest.fixture(scope="module")
def nights(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[FullResult, Path]]:
    """Nights 1-2 with a 2-day TTL (nothing is that old yet); night 3 twice from copies of that registry, with
    and without the TTL; night 4 with it. The gate's margin is wide open: these tests are about the tables."""
    root = tmp_path_factory.mktemp("models")
    ttl = root / "ttl"

    def night(models: Path, day: int, **changes: object) -> tuple[FullResult, Path]:
        settings = full_settings(archive, models, DAYS[day - 1], gate_margin=1.0, **changes)
        return run_full(settings, MODEL, TRAIN), models

    out = {"night1": night(ttl, 1, id_ttl_days=2.0), "night2": night(ttl, 2, id_ttl_days=2.0)}
    shutil.copytree(ttl, root / "keep")
    # Night 2's version as versions were written before activity was kept: the same weights, no activity file.
    night2 = out["night2"][0].version_id
    old = Registry(root / "old")
    with old.new_version(night2) as directory:
        save_version(directory, load_version(Registry(ttl).path(night2)))
    old.promote(night2)
    out["night3_old"] = night(root / "old", 3, id_ttl_days=2.0)
    out["night3"] = night(ttl, 3, id_ttl_days=2.0)
    out["night3_keep"] = night(root / "keep", 3)
    out["night4"] = night(ttl, 4, id_ttl_days=2.0)
    return out


def _version(pair: tuple[FullResult, Path]):
    result, models = pair
    assert result.exit_code == EXIT_PROMOTED, result.message
    return load_version(Registry(models).path(result.version_id))


def test_nothing_expires_within_the_ttl(nights: dict) -> None:
    v2 = _version(nights["night2"])
    assert len(v2.encoder.user_vocab) == 11 and len(v2.encoder.item_vocab) == 11
    assert v2.manifest["metrics"]["ids"] == {
        "ttl_days": 2.0,
        "expired": {"user": 0, "item": 0},
        "inactive_new": {"user": 0, "item": 0},
        "rows": {"user": 11, "item": 11},
    }


def test_inactive_ids_expire_and_the_rest_train_as_without_expiry(nights: dict) -> None:
    v3, keep = _version(nights["night3"]), _version(nights["night3_keep"])
    # Since day 2's start (day 3's end - 2 days): u0..u4 clicked, i0..i7 were clicked; u5..u9, i8, i9 were not.
    assert set(v3.encoder.user_vocab.tokens) == {f"u{k}" for k in range(5)}
    assert set(v3.encoder.item_vocab.tokens) == {f"i{n}" for n in range(8)}
    assert v3.manifest["metrics"]["ids"]["expired"] == {"user": 5, "item": 2}
    assert len(keep.encoder.user_vocab) == 11 and keep.manifest["metrics"]["ids"]["expired"] == {"user": 0, "item": 0}
    # The surviving rows trained exactly as they would have with every row kept (Adam is elementwise; the
    # dropped ids had no clicks that day), and so did every dense weight.
    for tower in ("user_tower", "item_tower"):
        table, other = getattr(v3.model, tower).id_table.weight, getattr(keep.model, tower).id_table.weight
        vocab = v3.encoder.user_vocab if tower == "user_tower" else v3.encoder.item_vocab
        other_vocab = keep.encoder.user_vocab if tower == "user_tower" else keep.encoder.item_vocab
        rows = [other_vocab.index(t) for t in vocab.tokens]
        assert torch.allclose(table[1:], other[rows], atol=1e-6)
        assert torch.allclose(table[0], other[0], atol=1e-6)
    dense = dict(keep.model.named_parameters())
    tables = set(v3.model.id_row_tables())
    for name, param in v3.model.named_parameters():
        if name not in tables:
            assert torch.allclose(param, dense[name], atol=1e-6), name
    # Adam's moments moved with their rows.
    moments = load_training_state(v3.path).optimizer
    other_moments = load_training_state(keep.path).optimizer
    name = "user_tower.embeddings.user_id.weight"
    rows = [keep.encoder.user_vocab.index(t) for t in v3.encoder.user_vocab.tokens]
    assert torch.allclose(moments[name]["exp_avg_sq"][1:], other_moments[name]["exp_avg_sq"][rows], atol=1e-9)
    # Expired items stay in the version's index, with vectors from their features and the default row.
    assert v3.item_ids[-2:] == ["i8", "i9"] and len(v3.item_ids) == 10
    records = {name: _item(name, DAY1_MS) for name in ("i8", "i9", "new")}
    with torch.no_grad():
        expected = v3.model.item_vectors(v3.encoder.encode_items(["i8", "i9", "new"], records)).numpy()
    assert np.allclose(v3.item_vectors[-2:], expected[:2], atol=1e-6)
    assert np.allclose(expected[0], expected[2], atol=1e-6)  # the same as an item never seen, with i8's features
    # The activity saved with it: u0's newest trained click is on day 3.
    activity = load_id_activity(v3.path)
    assert activity is not None and activity.fits(v3.encoder)
    u0 = int(activity.user[v3.encoder.user_vocab.index("u0")])
    assert DAY1_MS + 2 * DAY_MS < u0 < DAY1_MS + 3 * DAY_MS


def test_a_parent_without_activity_counts_every_id_active_at_its_cutoff(nights: dict) -> None:
    v2, v3 = _version(nights["night2"]), _version(nights["night3_old"])
    assert load_id_activity(v2.path) is not None  # the original has it; the copy in "old" does not
    # Every id of the parent counts as active at its cutoff (during day 2), inside the 2-day TTL: none expires,
    # and from now on the activity is kept.
    assert v3.manifest["metrics"]["ids"]["expired"] == {"user": 0, "item": 0}
    assert len(v3.encoder.user_vocab) == 11
    activity = load_id_activity(v3.path)
    u9 = int(activity.user[v3.encoder.user_vocab.index("u9")])
    assert u9 == v2.data_cutoff_ms


def test_an_id_that_comes_back_starts_again_from_the_default_row(nights: dict) -> None:
    v3, v4 = _version(nights["night3"]), _version(nights["night4"])
    assert "u5" not in v3.encoder.user_vocab and "u5" in v4.encoder.user_vocab
    assert v4.parent == v3.version_id
    # i8 and i9 are still in the catalogue, so the night extends the vocabulary with them again; their records
    # are old and nothing else touched them: dropped before training, reported apart from expired rows.
    assert v4.manifest["metrics"]["ids"]["expired"] == {"user": 0, "item": 0}
    assert v4.manifest["metrics"]["ids"]["inactive_new"] == {"user": 0, "item": 2}
    assert "i8" not in v4.encoder.item_vocab and v4.item_ids[-2:] == ["i8", "i9"]
    activity = load_id_activity(v4.path)
    assert activity.user[v4.encoder.user_vocab.index("u5")] > DAY1_MS + 3 * DAY_MS
    # Its day-1 row is gone for good: the row it has now moved away from night 3's default row by training only.
    v1 = _version(nights["night1"])
    old = v1.model.user_tower.id_table.weight[v1.encoder.user_vocab.index("u5")]
    new = v4.model.user_tower.id_table.weight[v4.encoder.user_vocab.index("u5")]
    default = v3.model.user_tower.id_table.weight[0]
    assert torch.linalg.vector_norm(new - default) < torch.linalg.vector_norm(old - default)


def test_cli_flag(archive: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    for day in DAYS[:3]:
        code = main(
            [
                "full",
                "--archive",
                str(archive),
                "--models",
                str(models),
                "--day",
                day.isoformat(),
                "--id-ttl-days",
                "1",
                "--margin",
                "1",
                "--no-progress",
            ]
        )
        assert code == EXIT_PROMOTED
    version = load_version(Registry(models).path(Registry(models).current()))
    # A 1-day TTL on day 3: only day 3's clickers and clicked items keep rows.
    assert version.manifest["metrics"]["ids"]["ttl_days"] == 1.0
    assert set(version.encoder.user_vocab.tokens) == {f"u{k}" for k in range(5)}
    assert main(["full", "--archive", str(archive), "--models", str(models), "--id-ttl-days", "0"]) == 2
