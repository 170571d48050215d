"""A model version on disk: everything serving needs to answer requests, checked by sha256 on load.

A version is a directory::

    manifest.json      version id, parent, created time, data cutoff (ms, newest event used), data range,
                       config (model + train), metrics, and {file: {sha256, bytes}} for every file below
    weights.pt         the model's state dict (dense towers + embedding tables), torch.save of plain tensors
    encoder.json       the feature encoder: feature specs, vocabularies, fitted statistics
    item_ids.json      the item id of every row of the item vectors / index
    item_vectors.npy   float32 [n_items, dim] unit item vectors (plain .npy, no pickle)
    items.faiss        faiss IndexFlatIP over the same vectors; faiss ids are row numbers
    optimizer.pt       optional: the optimizer's per-parameter state (Adam: step, exp_avg, exp_avg_sq) keyed by
                       parameter NAME, plain tensors
    frequency.npz      optional: the logQ frequency estimator's arrays and step (:class:`FrequencyEstimator`)
    id_activity.npz    optional: the newest activity time of every user and item id (:class:`IdActivity`), from
                       which the next nightly run expires ids (:mod:`trainer.expiry`)

The optimizer and frequency files are the :class:`~trainer.warm_state.TrainingState` the next nightly run warm-starts from besides the
weights (DESIGN.md "Updating the model": the full update starts from yesterday's parameters; Yi et al. 2019:
``p_j`` follows the stream, so an estimate restarted every night is wrong for the first batches). Versions
saved without them still load; serving never reads them (:func:`load_training_state` does).

Nothing here is ever unpickled into code: weights and optimizer state load with
``torch.load(..., weights_only=True)``, arrays with ``allow_pickle=False``, the rest is JSON. The manifest is
the root of trust: every file it lists is checked, and a file whose size or sha256 differs from it (truncated,
replaced, bit-flipped) raises :class:`ArtifactError` before it is parsed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import pickle
import secrets
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor

from streaming.events import Item
from trainer.expiry import IdActivity
from trainer.features import FeatureEncoder
from trainer.model import ModelConfig, TwoTowerModel
from trainer.train import TrainConfig
from trainer.warm_state import TrainingState

__all__ = [
    "ArtifactError",
    "MANIFEST",
    "ModelVersion",
    "build_index",
    "compute_item_vectors",
    "load_id_activity",
    "load_training_state",
    "load_version",
    "make_version",
    "new_version_id",
    "read_manifest",
    "save_version",
    "verify_files",
]

logger = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
ENCODER = "encoder.json"
ITEM_IDS = "item_ids.json"
ITEM_VECTORS = "item_vectors.npy"
INDEX = "items.faiss"
OPTIMIZER = "optimizer.pt"
FREQUENCY = "frequency.npz"
ACTIVITY = "id_activity.npz"
_FILES = (WEIGHTS, ENCODER, ITEM_IDS, ITEM_VECTORS, INDEX)  # required; OPTIMIZER, FREQUENCY, ACTIVITY optional
_CHUNK = 1 << 20


class ArtifactError(ValueError):
    """A version directory that is incomplete, damaged or inconsistent with its manifest."""


@dataclass(frozen=True)
class ModelVersion:
    """One model version, in memory. ``path`` is None until it is saved.

    item_vectors: ``[n_items, dim]`` float32 unit rows, row ``r`` is ``item_ids[r]``; ``index`` holds the
    same rows (faiss id = row number).
    """

    manifest: dict[str, Any]
    model: TwoTowerModel
    encoder: FeatureEncoder
    item_ids: list[str]
    item_vectors: np.ndarray
    index: faiss.Index
    path: Path | None = None

    @property
    def version_id(self) -> str:
        return self.manifest["version_id"]

    @property
    def parent(self) -> str | None:
        return self.manifest.get("parent")

    @property
    def data_cutoff_ms(self) -> int:
        return int(self.manifest["data_cutoff_ms"])

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["config"]["model"])

    @property
    def train_config(self) -> dict[str, Any] | None:
        """The training settings the version was made with, as written (None for a version built elsewhere)."""
        return self.manifest["config"].get("train")

    def search(self, user_vectors: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top ``k`` items by inner product for user_vectors ``[B, dim]``: scores ``[B, k']`` and item ids."""
        k = min(k, self.index.ntotal)
        scores, rows = self.index.search(np.ascontiguousarray(user_vectors, dtype=np.float32), k)
        return scores, [[self.item_ids[r] for r in row if r >= 0] for row in rows]


def new_version_id(now_ms: int | None = None) -> str:
    """A sortable, unique id such as ``20240102T030405Z-9f2c1a``."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    stamp = dt.datetime.fromtimestamp(now_ms / 1000, tz=dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


@torch.no_grad()
def compute_item_vectors(
    model: TwoTowerModel, encoder: FeatureEncoder, catalogue: Mapping[str, Item], batch_size: int = 4096
) -> tuple[list[str], np.ndarray]:
    """Vectors of every item the encoder knows (its item vocabulary, in index order), then of every catalogue
    item it has no ID row for (sorted; its row expired, :mod:`trainer.expiry`: features and the default row):
    ids and ``[N, dim]``.

    An id without a catalogue record (clicked but never described) gets default features, as in training.
    """
    vocab = encoder.item_vocab
    ids = list(vocab.tokens) + sorted(item for item in catalogue if item not in vocab)
    model.eval()
    parts = [
        model.item_vectors(encoder.encode_items(ids[s : s + batch_size], catalogue)).numpy()
        for s in range(0, len(ids), batch_size)
    ]
    vectors = np.concatenate(parts) if parts else np.zeros((0, model.config.dim), dtype=np.float32)
    return ids, vectors.astype(np.float32, copy=False)


def build_index(vectors: np.ndarray) -> faiss.Index:
    """Exact inner-product index over L2-normalised copies of ``vectors`` ``[N, dim]`` (cosine search)."""
    unit = np.ascontiguousarray(vectors, dtype=np.float32).copy()
    if len(unit):
        faiss.normalize_L2(unit)
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit)
    return index


def make_version(
    model: TwoTowerModel,
    encoder: FeatureEncoder,
    catalogue: Mapping[str, Item],
    *,
    version_id: str,
    parent: str | None,
    data_range: tuple[int, int],
    data_cutoff_ms: int,
    train_config: TrainConfig | None = None,
    metrics: Mapping[str, Any] | None = None,
    created_ms: int | None = None,
) -> ModelVersion:
    """A version in memory: item vectors of the encoder's items, their index, and the manifest (without files).

    ``data_range``: ``(start_ms, end_ms)``, half-open, of the events trained on; ``data_cutoff_ms``: the newest
    event time used (the online learner replays from there when it switches to this version).
    """
    item_ids, vectors = compute_item_vectors(model, encoder, catalogue)
    index = build_index(vectors)
    unit = index.reconstruct_n(0, index.ntotal) if index.ntotal else vectors
    manifest = {
        "format": FORMAT,
        "version_id": version_id,
        "parent": parent,
        "created_ms": int(time.time() * 1000) if created_ms is None else int(created_ms),
        "data_cutoff_ms": int(data_cutoff_ms),
        "data_range": {"start_ms": int(data_range[0]), "end_ms": int(data_range[1])},
        "config": {
            "model": model.config.to_dict(),
            "train": dataclasses.asdict(train_config) if train_config is not None else None,
        },
        "metrics": dict(metrics or {}),
        "items": len(item_ids),
        "files": {},
    }
    return ModelVersion(manifest, model, encoder, item_ids, unit, index)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: they become null (the gate reads a missing metric as a failure)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def save_version(
    directory: str | Path,
    version: ModelVersion,
    *,
    metrics: Mapping[str, Any] | None = None,
    training_state: TrainingState | None = None,
    id_activity: IdActivity | None = None,
) -> Path:
    """Write ``version`` into the empty ``directory`` (a registry staging dir); returns the manifest path.

    ``metrics`` are merged into the manifest's metrics (e.g. the gate's verdict, known only after evaluation).
    ``training_state``: the optimizer and frequency state to carry into the next warm start (each optional);
    ``id_activity``: the ids' activity times, from which the next run expires ids (must fit the encoder).
    The manifest is written last, so a directory with a manifest has all its files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in version.model.state_dict().items()}
    torch.save(state, directory / WEIGHTS)
    (directory / ENCODER).write_text(version.encoder.to_json(), encoding="utf-8")
    (directory / ITEM_IDS).write_text(json.dumps(version.item_ids, ensure_ascii=False), encoding="utf-8")
    np.save(directory / ITEM_VECTORS, np.ascontiguousarray(version.item_vectors, dtype=np.float32), allow_pickle=False)
    faiss.write_index(version.index, str(directory / INDEX))
    names = list(_FILES)
    if training_state is not None and training_state.optimizer is not None:
        optimizer = {
            name: {key: value.detach().cpu().contiguous() for key, value in state.items()}
            for name, state in training_state.optimizer.items()
        }
        torch.save({"kind": training_state.optimizer_kind, "params": optimizer}, directory / OPTIMIZER)
        names.append(OPTIMIZER)
    if training_state is not None and training_state.frequency is not None:
        # Compressed: most buckets of a large table are untouched zeros on small days.
        np.savez_compressed(directory / FREQUENCY, **{k: np.asarray(v) for k, v in training_state.frequency.items()})
        names.append(FREQUENCY)
    if id_activity is not None:
        if not id_activity.fits(version.encoder):
            raise ValueError("id_activity does not fit the version's ID vocabularies")
        np.savez_compressed(directory / ACTIVITY, **id_activity.to_arrays())
        names.append(ACTIVITY)
    manifest = dict(version.manifest)
    manifest["metrics"] = {**manifest.get("metrics", {}), **dict(metrics or {})}
    manifest["files"] = {
        name: {"sha256": _sha256(directory / name), "bytes": (directory / name).stat().st_size} for name in names
    }
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(_json_safe(manifest), indent=1, allow_nan=False), encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)
    logger.info("saved version %s (%d items) to %s", manifest["version_id"], manifest["items"], directory)
    return directory / MANIFEST


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The parsed manifest of the version at ``path``; :class:`ArtifactError` if missing or malformed."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{file}: no manifest; not a complete model version") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"{file}: manifest is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ArtifactError(f"{file}: expected a manifest object of format {FORMAT}, got format {found!r}")
    for key in ("version_id", "data_cutoff_ms", "config", "files"):
        if key not in manifest:
            raise ArtifactError(f"{file}: manifest lacks {key!r}")
    return manifest


def verify_files(path: str | Path, manifest: Mapping[str, Any]) -> None:
    """Check every file the manifest lists against its size and sha256; raises :class:`ArtifactError`."""
    path = Path(path)
    files = manifest.get("files", {})
    missing = [name for name in _FILES if name not in files]
    if missing:
        raise ArtifactError(f"{path}: manifest lists no entry for {missing}")
    for name, meta in files.items():
        _verify_file(path / name, meta)


def _verify_file(file: Path, meta: Mapping[str, Any]) -> None:
    if not file.is_file():
        raise ArtifactError(f"{file}: missing; the manifest lists it with {meta['bytes']} bytes")
    size = file.stat().st_size
    if size != meta["bytes"]:
        raise ArtifactError(f"{file}: {size} bytes, manifest says {meta['bytes']} (truncated or replaced)")
    digest = _sha256(file)
    if digest != meta["sha256"]:
        raise ArtifactError(f"{file}: sha256 {digest[:16]}..., manifest says {meta['sha256'][:16]}... (tampered)")


def load_version(path: str | Path) -> ModelVersion:
    """Load and check the version at ``path``: files against the manifest, shapes against each other."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    encoder = FeatureEncoder.from_json((path / ENCODER).read_text(encoding="utf-8"))
    model = TwoTowerModel(encoder, ModelConfig.from_dict(manifest["config"]["model"]))
    try:
        state = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ArtifactError(f"{path / WEIGHTS}: not a plain state dict of tensors: {exc}") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{path / WEIGHTS}: weights do not fit the encoder's tables: {exc}") from None
    model.eval()
    item_ids = json.loads((path / ITEM_IDS).read_text(encoding="utf-8"))
    vectors = np.load(path / ITEM_VECTORS, allow_pickle=False)
    index = faiss.read_index(str(path / INDEX))
    dim = model.config.dim
    if vectors.shape != (len(item_ids), dim):
        raise ArtifactError(f"{path}: item vectors have shape {vectors.shape}, expected ({len(item_ids)}, {dim})")
    if index.ntotal != len(item_ids) or index.d != dim:
        raise ArtifactError(f"{path}: index holds {index.ntotal} x {index.d}, expected {len(item_ids)} x {dim}")
    return ModelVersion(manifest, model, encoder, item_ids, vectors, index, path)


def load_training_state(path: str | Path) -> TrainingState:
    """The optimizer and frequency state saved with the version at ``path``, each None when it has none (a
    version saved before they were kept). Checked against the manifest like every other file."""
    path = Path(path)
    files = read_manifest(path)["files"]
    kind = optimizer = frequency = None
    if OPTIMIZER in files:
        file = path / OPTIMIZER
        _verify_file(file, files[OPTIMIZER])
        try:
            raw = torch.load(file, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise ArtifactError(f"{file}: not a plain dict of tensors: {exc}") from None
        params = raw.get("params") if isinstance(raw, dict) else None
        well_formed = isinstance(params, dict) and all(
            isinstance(state, dict) and all(isinstance(v, Tensor) for v in state.values()) for state in params.values()
        )
        if not well_formed or not isinstance(raw.get("kind"), str):
            raise ArtifactError(f"{file}: expected {{'kind': str, 'params': {{name: {{key: tensor}}}}}}")
        kind, optimizer = raw["kind"], params
    if FREQUENCY in files:
        file = path / FREQUENCY
        _verify_file(file, files[FREQUENCY])
        try:
            with np.load(file, allow_pickle=False) as arrays:
                frequency = {name: arrays[name] for name in arrays.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ArtifactError(f"{file}: not a plain .npz of arrays: {exc}") from None
    return TrainingState(kind, optimizer, frequency)


def load_id_activity(path: str | Path) -> IdActivity | None:
    """The id activity saved with the version at ``path`` (None for a version saved without it), checked against
    the manifest (:meth:`IdActivity.fits` tells whether it fits the version's encoder)."""
    path = Path(path)
    files = read_manifest(path)["files"]
    if ACTIVITY not in files:
        return None
    file = path / ACTIVITY
    _verify_file(file, files[ACTIVITY])
    try:
        with np.load(file, allow_pickle=False) as arrays:
            activity = IdActivity.from_arrays({name: arrays[name] for name in arrays.files})
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{file}: not the plain user/item arrays of an id activity: {exc}") from None
    return activity
