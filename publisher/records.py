"""What a publish carries and how each row is written as bytes.

A :class:`Publish` is one version: the user rows (ID-embedding vector + last-N clicked item ids),
the item rows (item-tower vectors) and the removals that changed since the previous version,
stamped with a monotonically increasing version, the watermark (newest event time reflected in
it) and the source cursor it was pulled up to. The same byte encoding is used by the RocksDB
store and by the fan-out topic, so a replica applies exactly the bytes the primary stored.

Row encoding (little-endian, no pickle): a fixed ``struct`` header, the vector as ``float32``
bytes, and for users the last-N item ids as a UTF-8 JSON list::

    user: <B format=1><B flags><Q version><H dim><I last_n_len> <dim * f4> <last_n JSON>
    item: <B format=1><B flags><Q version><H dim>               <dim * f4>

``flags & 1`` marks a removed row (a tombstone, dim 0), kept so that readers catching up from an
older version learn of the removal.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "Delta",
    "ItemRow",
    "Meta",
    "Publish",
    "PublishError",
    "UserRow",
    "decode_item",
    "decode_meta",
    "decode_user",
    "encode_item",
    "encode_meta",
    "encode_user",
    "next_meta",
]

FORMAT = 1
REMOVED = 1
_USER = struct.Struct("<BBQHI")
_ITEM = struct.Struct("<BBQH")
_F32 = np.dtype("<f4")

UserUpdate = tuple[np.ndarray, tuple[str, ...]]


class PublishError(ValueError):
    """A publish that must not be written: wrong version, wrong dimension, non-finite values."""


@dataclass(frozen=True, slots=True)
class UserRow:
    """A user's published row. ``vector: [dim]`` float32 (read-only); ``version`` wrote it."""

    version: int
    vector: np.ndarray
    last_n: tuple[str, ...]
    removed: bool = False


@dataclass(frozen=True, slots=True)
class ItemRow:
    """An item's published vector ``[dim]`` float32 (read-only); ``version`` wrote it."""

    version: int
    vector: np.ndarray
    removed: bool = False


@dataclass(frozen=True, slots=True)
class Meta:
    """The record written in the same batch as a version's rows: what the store holds, as a whole.

    ``users``/``items`` count the rows (removals included) written by this version; ``user_dim``
    and ``item_dim`` are the vector sizes of the current model (0 while none was published).
    """

    version: int
    watermark_ms: int
    model_version: str
    cursor: str
    created_ms: int
    users: int
    items: int
    user_dim: int
    item_dim: int


@dataclass(frozen=True)
class Publish:
    """One version to write atomically. ``users: {id: (vector [d], last_n)}``, ``items: {id: vector [d]}``."""

    version: int
    watermark_ms: int
    model_version: str
    cursor: str
    users: Mapping[str, UserUpdate] = field(default_factory=dict)
    items: Mapping[str, np.ndarray] = field(default_factory=dict)
    removed_users: frozenset[str] = frozenset()
    removed_items: frozenset[str] = frozenset()
    created_ms: int = 0

    def rows(self) -> int:
        return len(self.users) + len(self.items) + len(self.removed_users) + len(self.removed_items)


@dataclass(frozen=True)
class Delta:
    """Rows changed in ``(since, version]`` as seen by one consistent view; removed rows have ``removed=True``."""

    since: int
    version: int
    users: dict[str, UserRow]
    items: dict[str, ItemRow]


def _dim_of(kind: str, vectors: list[tuple[str, np.ndarray]]) -> int:
    """The common dimension of ``vectors``, after checking each is 1-D and finite."""
    dims: set[int] = set()
    for key, vector in vectors:
        v = np.asarray(vector)
        if v.ndim != 1 or v.shape[0] == 0:
            raise PublishError(f"{kind} {key!r}: expected a vector of shape [dim], got shape {v.shape}")
        if not np.isfinite(v).all():
            raise PublishError(f"{kind} {key!r}: vector has non-finite values")
        dims.add(v.shape[0])
    if len(dims) > 1:
        raise PublishError(f"{kind} vectors of one publish must share a dimension, got dims {sorted(dims)}")
    return dims.pop() if dims else 0


def next_meta(prev: Meta | None, publish: Publish, now_ms: int) -> Meta:
    """Check ``publish`` against the store's current meta and return the meta it will write.

    Raises :class:`PublishError` when the version does not increase, an id is both updated and
    removed, a vector is malformed, or dims differ from the store's under the same model version.
    """
    current = prev.version if prev else 0
    if publish.version <= current:
        raise PublishError(f"publish version must exceed the store's version {current}, got {publish.version}")
    for kind, updated, removed in (
        ("user", publish.users, publish.removed_users),
        ("item", publish.items, publish.removed_items),
    ):
        both = set(updated) & set(removed)
        if both:
            raise PublishError(f"{kind} ids both updated and removed in one publish: {sorted(both)[:5]}")
        empty = [k for k in (*updated, *removed) if not isinstance(k, str) or not k]
        if empty:
            raise PublishError(f"{kind} ids must be non-empty strings, got {empty[:5]!r}")
    user_dim = _dim_of("user", [(k, v) for k, (v, _) in publish.users.items()])
    item_dim = _dim_of("item", list(publish.items.items()))
    same_model = prev is not None and prev.model_version == publish.model_version
    if same_model and prev is not None:
        # A new model may change sizes; within one model a different size means a bug upstream.
        for kind, new, old in (("user", user_dim, prev.user_dim), ("item", item_dim, prev.item_dim)):
            if new and old and new != old:
                raise PublishError(
                    f"{kind} vectors have dim {new}, the store holds dim {old} for model {prev.model_version!r}"
                )
    return Meta(
        version=publish.version,
        watermark_ms=int(publish.watermark_ms),
        model_version=publish.model_version,
        cursor=publish.cursor,
        created_ms=int(publish.created_ms or now_ms),
        users=len(publish.users) + len(publish.removed_users),
        items=len(publish.items) + len(publish.removed_items),
        user_dim=user_dim or (prev.user_dim if same_model and prev else 0),
        item_dim=item_dim or (prev.item_dim if same_model and prev else 0),
    )


def encode_user(version: int, vector: np.ndarray | None, last_n: tuple[str, ...] = ()) -> bytes:
    """Bytes of a user row; ``vector=None`` writes a removal."""
    if vector is None:
        return _USER.pack(FORMAT, REMOVED, version, 0, 0)
    v = np.ascontiguousarray(vector, dtype=_F32)
    tail = json.dumps(list(last_n), separators=(",", ":")).encode() if last_n else b""
    return _USER.pack(FORMAT, 0, version, v.shape[0], len(tail)) + v.tobytes() + tail


def decode_user(data: bytes) -> UserRow:
    fmt, flags, version, dim, n = _USER.unpack_from(data)
    if fmt != FORMAT:
        raise ValueError(f"user row: expected format {FORMAT}, got {fmt}")
    start = _USER.size + 4 * dim
    vector = np.frombuffer(data, dtype=_F32, count=dim, offset=_USER.size)
    last_n = tuple(json.loads(data[start : start + n])) if n else ()
    return UserRow(version=version, vector=vector, last_n=last_n, removed=bool(flags & REMOVED))


def encode_item(version: int, vector: np.ndarray | None) -> bytes:
    """Bytes of an item row; ``vector=None`` writes a removal."""
    if vector is None:
        return _ITEM.pack(FORMAT, REMOVED, version, 0)
    v = np.ascontiguousarray(vector, dtype=_F32)
    return _ITEM.pack(FORMAT, 0, version, v.shape[0]) + v.tobytes()


def decode_item(data: bytes) -> ItemRow:
    fmt, flags, version, dim = _ITEM.unpack_from(data)
    if fmt != FORMAT:
        raise ValueError(f"item row: expected format {FORMAT}, got {fmt}")
    vector = np.frombuffer(data, dtype=_F32, count=dim, offset=_ITEM.size)
    return ItemRow(version=version, vector=vector, removed=bool(flags & REMOVED))


def encode_meta(meta: Meta) -> bytes:
    return json.dumps(asdict(meta), separators=(",", ":"), sort_keys=True).encode()


def decode_meta(data: bytes) -> Meta:
    raw = json.loads(data)
    try:
        return Meta(**raw)
    except TypeError as exc:
        raise ValueError(f"meta record: expected fields {list(Meta.__dataclass_fields__)}, got {sorted(raw)}") from exc
