"""Model versions on disk and the registry: round trips, damage detection, atomic promotion, rollback, pruning."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from streaming.events import Click, Item, UserProfile
from trainer.artifact import (
    ArtifactError,
    ModelVersion,
    load_version,
    make_version,
    read_manifest,
    save_version,
    verify_files,
)
from trainer.dataset import Dataset
from trainer.features import FeatureEncoder
from trainer.model import ModelConfig, TwoTowerModel
from trainer.registry import CurrentChanged, Registry, RegistryError

torch.set_num_threads(1)
T0 = 1_704_067_200_000


def _dataset() -> Dataset:
    items = [Item(f"i{k}", f"c{k % 2}", (f"t{k % 3}",), {"price": float(k)}, T0, T0) for k in range(6)]
    users = [UserProfile(f"u{k}", {"city": f"x{k % 2}"}, {}, {"age": 20.0 + k}, T0) for k in range(4)]
    clicks = [Click(f"u{k % 4}", f"i{(3 * k) % 6}", f"r{k}", T0 + 1000 * k) for k in range(12)]
    return Dataset.from_events([*items, *users, *clicks])


@pytest.fixture(scope="module")
def tiny() -> tuple[TwoTowerModel, FeatureEncoder, Dataset]:
    data = _dataset()
    encoder = FeatureEncoder.fit(data, last_n=3)
    return TwoTowerModel(encoder, ModelConfig(dim=8, id_dim=8, embedding_dim=4, hidden=(16,), seed=3)), encoder, data


def _version(tiny: tuple, version_id: str, parent: str | None = None, created_ms: int = 0) -> ModelVersion:
    model, encoder, data = tiny
    return make_version(
        model,
        encoder,
        data.items,
        version_id=version_id,
        parent=parent,
        data_range=(T0, T0 + 86_400_000),
        data_cutoff_ms=T0 + 11_000,
        metrics={"train": {"loss": 1.5}},
        created_ms=created_ms,
    )


def _register(registry: Registry, tiny: tuple, version_id: str, parent: str | None = None, created_ms: int = 0) -> Path:
    with registry.new_version(version_id) as staging:
        save_version(staging, _version(tiny, version_id, parent, created_ms))
    return registry.path(version_id)


# ----------------------------------------------------------------------------------------------- artifact
def test_save_load_round_trip(tmp_path: Path, tiny: tuple) -> None:
    version = _version(tiny, "v1", parent="v0")
    save_version(tmp_path, version, metrics={"gate": {"accepted": True}, "nan": float("nan")})
    loaded = load_version(tmp_path)
    assert loaded.version_id == "v1" and loaded.parent == "v0" and loaded.path == tmp_path
    assert loaded.data_cutoff_ms == T0 + 11_000
    assert loaded.manifest["data_range"] == {"start_ms": T0, "end_ms": T0 + 86_400_000}
    # Metrics merge; NaN is stored as null (JSON has no NaN).
    assert loaded.manifest["metrics"] == {"train": {"loss": 1.5}, "gate": {"accepted": True}, "nan": None}
    assert loaded.model_config == tiny[0].config
    assert sorted(loaded.manifest["files"]) == [
        "encoder.json",
        "item_ids.json",
        "item_vectors.npy",
        "items.faiss",
        "weights.pt",
    ]
    for name, tensor in tiny[0].state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    # Six catalogue items in vocabulary order, unit vectors, and the index returns each item as its own best match.
    assert loaded.item_ids == ["i0", "i1", "i2", "i3", "i4", "i5"]
    np.testing.assert_allclose(np.linalg.norm(loaded.item_vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(loaded.item_vectors, version.item_vectors)
    _, ranked = loaded.search(loaded.item_vectors, 1)
    assert [r[0] for r in ranked] == loaded.item_ids
    # The loaded model computes the same item vectors as the stored ones.
    model, encoder, data = tiny
    with torch.no_grad():
        fresh = loaded.model.item_vectors(loaded.encoder.encode_items(loaded.item_ids, data.items)).numpy()
    np.testing.assert_allclose(fresh, loaded.item_vectors, atol=1e-6)


def test_truncated_or_tampered_files_are_refused(tmp_path: Path, tiny: tuple) -> None:
    save_version(tmp_path, _version(tiny, "v1"))
    weights = tmp_path / "weights.pt"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(ArtifactError, match=r"weights.pt: \d+ bytes, manifest says \d+ \(truncated or replaced\)"):
        load_version(tmp_path)
    # Same size, one byte changed.
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match=r"weights.pt: sha256 .* \(tampered\)"):
        load_version(tmp_path)
    weights.write_bytes(original)
    (tmp_path / "item_ids.json").unlink()
    with pytest.raises(ArtifactError, match="item_ids.json: missing"):
        load_version(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest"):
        load_version(tmp_path)


def test_weights_are_loaded_without_unpickling_code(tmp_path: Path, tiny: tuple) -> None:
    save_version(tmp_path, _version(tiny, "v1"))

    class Payload:
        def __reduce__(self) -> tuple:
            return (print, ("unpickled!",))

    # A weights file carrying an arbitrary object, with a manifest updated to match it (the attacker's best case).
    torch.save({"x": Payload()}, tmp_path / "weights.pt")
    manifest = read_manifest(tmp_path)
    data = (tmp_path / "weights.pt").read_bytes()
    manifest["files"]["weights.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not a plain state dict of tensors"):
        load_version(tmp_path)


# ----------------------------------------------------------------------------------------------- registry
def test_versions_appear_only_when_complete(tmp_path: Path, tiny: tuple) -> None:
    registry = Registry(tmp_path)
    assert registry.current() is None and registry.list() == []
    with pytest.raises(RuntimeError, match="disk full"), registry.new_version("v1") as staging:
        save_version(staging, _version(tiny, "v1"))
        raise RuntimeError("disk full")
    # A failed write leaves nothing behind, neither in versions/ nor in staging/.
    assert registry.list() == [] and list(registry.staging_dir.iterdir()) == []
    with pytest.raises(ArtifactError, match="no manifest"), registry.new_version("v2") as staging:
        (staging / "weights.pt").write_bytes(b"partial")
    # A directory without a manifest (e.g. copied in by hand) is never listed or promoted.
    (registry.versions_dir / "v3").mkdir()
    (registry.versions_dir / "v3" / "weights.pt").write_bytes(b"x")
    assert registry.list() == []
    with pytest.raises(RegistryError, match="no complete version 'v3'"):
        registry.promote("v3")
    with pytest.raises(RegistryError, match="version id must match"):
        registry.path("../etc")
    path = _register(registry, tiny, "v4")
    assert [v.version_id for v in registry.list()] == ["v4"] and path == registry.versions_dir / "v4"
    with pytest.raises(RegistryError, match="already exists"), registry.new_version("v4"):
        pass
    assert registry.current() is None


def test_promote_rollback_and_history(tmp_path: Path, tiny: tuple) -> None:
    registry = Registry(tmp_path)
    for k, parent in ((1, None), (2, "v1"), (3, "v2")):
        _register(registry, tiny, f"v{k}", parent, created_ms=k)
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()
    registry.promote("v1")
    registry.promote("v2")
    registry.promote("v3", reason="better")
    assert registry.current() == "v3" and registry.previous() == "v2"
    # Rollback walks back through the promotions: v3 -> v2 -> v1, then there is nothing older.
    assert registry.rollback(reason="bad") == "v2"
    assert registry.current() == "v2" and registry.previous() == "v1"
    assert registry.rollback() == "v1"
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()
    assert [(h["action"], h["version"], h["from"]) for h in registry.history()] == [
        ("promote", "v1", None),
        ("promote", "v2", "v1"),
        ("promote", "v3", "v2"),
        ("rollback", "v2", "v3"),
        ("rollback", "v1", "v2"),
    ]
    assert registry.history()[2]["reason"] == "better"
    # A new process sees the same state.
    assert Registry(tmp_path).current() == "v1"


def test_promote_refuses_a_damaged_version(tmp_path: Path, tiny: tuple) -> None:
    registry = Registry(tmp_path)
    _register(registry, tiny, "v1")
    path = _register(registry, tiny, "v2", "v1")
    registry.promote("v1")
    (path / "items.faiss").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="items.faiss"):
        registry.promote("v2")
    assert registry.current() == "v1"


def test_conditional_promote_refuses_when_current_moved(tmp_path: Path, tiny: tuple) -> None:
    registry = Registry(tmp_path)
    for k in (1, 2, 3):
        _register(registry, tiny, f"v{k}", "v1" if k > 1 else None)
    registry.promote("v1", expect_current=None)  # nothing current yet: as expected
    registry.promote("v2", expect_current="v1")
    registry.rollback()  # by hand, while a run that started from v2 trains
    with pytest.raises(CurrentChanged, match="current version is 'v1', not 'v2'"):
        registry.promote("v3", expect_current="v2")
    assert registry.current() == "v1" and [h["action"] for h in registry.history()] == [
        "promote",
        "promote",
        "rollback",
    ]
    with pytest.raises(CurrentChanged):
        registry.promote("v3", expect_current=None)
    registry.promote("v3")  # unconditional: whatever is current
    assert registry.current() == "v3"


def test_prune_keeps_newest_current_and_its_parent(tmp_path: Path, tiny: tuple) -> None:
    registry = Registry(tmp_path, keep=2)
    parents = {1: None, 2: "v1", 3: "v1", 4: "v3", 5: "v4", 6: "v5"}
    for k, parent in parents.items():
        _register(registry, tiny, f"v{k}", parent, created_ms=k)
    registry.promote("v2")
    registry.promote("v3")  # current v3, its parent v1, rollback target v2
    # Newest two (v5, v6) + current v3 + parent v1 + rollback target v2 survive; v4 goes.
    assert registry.prune() == ["v4"]
    assert [v.version_id for v in registry.list()] == ["v1", "v2", "v3", "v5", "v6"]
    assert registry.current() == "v3"
    load_version(registry.path("v3"))


def test_readers_never_see_a_partial_version(tmp_path: Path, tiny: tuple) -> None:
    # One thread promotes back and forth and registers new versions while another resolves CURRENT
    # and lists versions: every id it gets must name a complete directory whose manifest matches.
    registry = Registry(tmp_path, keep=100)
    for k in range(3):
        _register(registry, tiny, f"v{k}", created_ms=k)
    registry.promote("v0")
    problems: list[str] = []
    resolved: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        reader_registry = Registry(tmp_path)
        while not stop.is_set():
            try:
                current = reader_registry.current()
                path = reader_registry.path(current)
                manifest = read_manifest(path)
                verify_files(path, manifest)
                if manifest["version_id"] != current:
                    problems.append(f"CURRENT says {current}, its manifest says {manifest['version_id']}")
                resolved.add(current)
                for info in reader_registry.list():
                    verify_files(info.path, read_manifest(info.path))
            except Exception as exc:  # any failure to resolve is a broken invariant
                problems.append(repr(exc))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for step in range(60):
            registry.promote(f"v{step % 3}")
            if step % 10 == 0:
                _register(registry, tiny, f"w{step}", created_ms=100 + step)
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert len(resolved) >= 2  # the reader really saw promotions happen
    # The first promotion + steps 1..59 (step 0 promotes v0 again, a no-op that is not recorded).
    assert len(registry.history()) == 60


def test_version_info_links_parent(tmp_path: Path, tiny: tuple) -> None:
    registry = Registry(tmp_path)
    _register(registry, tiny, "v1", created_ms=5)
    _register(registry, tiny, "v2", "v1", created_ms=6)
    infos = {v.version_id: v for v in registry.list()}
    assert infos["v2"].parent == "v1" and infos["v1"].parent is None
    assert infos["v2"].created_ms == 6


def test_command_line_lists_rolls_back_and_promotes(
    tmp_path: Path, tiny: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainer.__main__ import main

    root = tmp_path / "models"
    registry = Registry(root)
    for k, vid in enumerate(("20240101T000000Z-aaaaaa", "20240102T000000Z-bbbbbb", "20240103T000000Z-cccccc")):
        _register(registry, tiny, vid, created_ms=T0 + k)
    registry.promote("20240101T000000Z-aaaaaa")
    registry.promote("20240102T000000Z-bbbbbb")
    args = ["--models", str(root)]

    assert main(["versions", *args, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["current"] == "20240102T000000Z-bbbbbb" and listed["rollback_target"] == "20240101T000000Z-aaaaaa"
    assert [v["version"] for v in listed["versions"]] == sorted(v["version"] for v in listed["versions"])
    assert [v["current"] for v in listed["versions"]] == [False, True, False]
    assert listed["versions"][0]["data_cutoff_ms"] == T0 + 11_000
    assert main(["versions", *args]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("* 20240102T000000Z-bbbbbb") and table[1].startswith("< 20240101T000000Z-aaaaaa")
    assert "2024-01-01 00:00" in table[1]  # the data cutoff, T0 + 11 s, in UTC

    # The operator's two moves: back to the previous version, then forward to one that was never promoted.
    assert main(["rollback", *args, "--reason", "bad model"]) == 0
    assert registry.current() == "20240101T000000Z-aaaaaa"
    assert main(["promote", "20240103T000000Z-cccccc", *args]) == 0
    assert registry.current() == "20240103T000000Z-cccccc"
    assert [(h["action"], h["version"], h["reason"]) for h in registry.history()][-2:] == [
        ("rollback", "20240101T000000Z-aaaaaa", "bad model"),
        ("promote", "20240103T000000Z-cccccc", "manual promotion"),
    ]
    capsys.readouterr()
    # Mistakes get a message and exit code 2, and change nothing.
    assert main(["promote", "20991231T000000Z-ffffff", *args]) == 2
    assert main(["promote", "not-a-version", *args]) == 2
    assert main(["versions", "--models", str(tmp_path / "nowhere")]) == 2
    assert not (tmp_path / "nowhere").exists()
    assert registry.current() == "20240103T000000Z-cccccc"
    lone = Registry(tmp_path / "lone")
    _register(lone, tiny, "20240101T000000Z-aaaaaa")
    lone.promote("20240101T000000Z-aaaaaa")
    assert main(["rollback", "--models", str(tmp_path / "lone")]) == 2
