"""Feature specs, vocabularies and the encoder that turns ids and records into tensor batches.

A tower's inputs are declared as a tuple of frozen specs (seed 002, DESIGN.md "The model"):

* :class:`IdFeature`: the user or item id, embedded (the only tables the online learner updates);
* :class:`DiscreteFeature`: one categorical value (city, category), embedded, or one-hot when the
  vocabulary is tiny (gender);
* :class:`MultiValuedFeature`: a set of categorical values (tags, interest topics), embedded and mean-pooled;
* :class:`ContinuousFeature`: a number, standardised with statistics fitted on the training data, ``log1p``
  first for long tails, or bucketised by training quantiles into an embedding;
* :class:`LastNFeature`: the user's last N clicked items before the example's time, embedded and mean-pooled.
  Never attention over the candidate: the user vector must not depend on the item it is scored against.

A spec's ``source`` names where the value lives in the record: ``"category"``, ``"tags"``, ``"stats.price"``
(the key ``price`` of ``Item.stats``), ``"discrete.city"``, ``"multi.topics"``, ``"numeric.age"``.

:class:`FeatureEncoder` owns one :class:`Vocab` per categorical feature (index 0 = unknown/default) and the
fitted statistics of the continuous ones; it is plain JSON (no pickle). :meth:`FeatureEncoder.extend` appends
the ids and values of new data *after* the existing ones, so yesterday's rows keep their index and a warm-started
model can copy its embedding tables row for row. The feature set itself and the fitted statistics never change
after :meth:`FeatureEncoder.fit`: the trained MLP expects the inputs it was trained on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from streaming.events import Item, UserProfile
from trainer.dataset import Dataset

__all__ = [
    "CONTINUOUS_CLIP",
    "ContinuousFeature",
    "DiscreteFeature",
    "FeatureBatch",
    "FeatureEncoder",
    "FeatureSpec",
    "IdFeature",
    "ItemBatch",
    "LastNFeature",
    "MultiValuedFeature",
    "UserBatch",
    "Vocab",
    "default_item_features",
    "default_user_features",
]

logger = logging.getLogger(__name__)

ENCODER_FORMAT = 1
# Bound of a standardised continuous value, in training standard deviations. The training data of the bundled data
# sets stays within ±9 (MovieLens-100K's release years reach -4.7; the synthetic world's log lengths +8.7).
CONTINUOUS_CLIP = 10.0


# --------------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class IdFeature:
    """The entity's own id (``user_id`` / ``item_id``), embedded with ``ModelConfig.id_dim``."""

    name: str
    kind: Literal["id"] = field(default="id", init=False)


@dataclass(frozen=True)
class DiscreteFeature:
    """One categorical value read from ``source``. ``one_hot``: width of a one-hot input instead of an
    embedding; the vocabulary is then capped at that many entries (unknown included), later values map to 0."""

    name: str
    source: str
    one_hot: int | None = None
    kind: Literal["discrete"] = field(default="discrete", init=False)


@dataclass(frozen=True)
class MultiValuedFeature:
    """A tuple of categorical values read from ``source``, mean-pooled; at most ``max_values`` are kept."""

    name: str
    source: str
    max_values: int = 32
    kind: Literal["multi"] = field(default="multi", init=False)


@dataclass(frozen=True)
class ContinuousFeature:
    """A number read from ``source``.

    ``"standard"``: ``(x - mean) / std``; ``"log"``: the same on ``log1p(max(x, 0))`` (long tails: prices,
    counts, account ages); ``"bucket"``: ``num_buckets`` buckets between training quantiles, embedded.
    A missing value enters as 0 (the training mean) or as bucket 0. Standardised values are clipped to
    ``±CONTINUOUS_CLIP``: one valid but extreme record (a price of 1e300) must not overflow the tower into NaN,
    which would poison every row of its batch.
    """

    name: str
    source: str
    transform: Literal["standard", "log", "bucket"] = "standard"
    num_buckets: int = 10
    kind: Literal["continuous"] = field(default="continuous", init=False)


@dataclass(frozen=True)
class LastNFeature:
    """The user's last ``n`` clicked items strictly before the example's time, mean-pooled.

    Indexed with the item-id vocabulary of the item tower's :class:`IdFeature` named ``item_vocab``, but embedded
    in a table of the user tower's own (see :mod:`trainer.towers` for why it is not shared).
    """

    name: str = "last_n"
    n: int = 20
    item_vocab: str = "item_id"
    kind: Literal["last_n"] = field(default="last_n", init=False)


FeatureSpec = IdFeature | DiscreteFeature | MultiValuedFeature | ContinuousFeature | LastNFeature
_SPEC_TYPES: dict[str, type] = {
    "id": IdFeature,
    "discrete": DiscreteFeature,
    "multi": MultiValuedFeature,
    "continuous": ContinuousFeature,
    "last_n": LastNFeature,
}


def _spec_to_dict(spec: FeatureSpec) -> dict[str, Any]:
    return asdict(spec)


def _spec_from_dict(raw: Mapping[str, Any]) -> FeatureSpec:
    kind = raw.get("kind")
    if kind not in _SPEC_TYPES:
        raise ValueError(f"unknown feature kind {kind!r}; expected one of {sorted(_SPEC_TYPES)}")
    return _SPEC_TYPES[kind](**{k: v for k, v in raw.items() if k != "kind"})


def _read(record: Any, source: str) -> Any:
    """``record.<field>`` or ``record.<field>[key]`` for ``source = "field.key"``; None when absent."""
    if record is None:
        return None
    head, _, key = source.partition(".")
    value = getattr(record, head, None)
    if key:
        return value.get(key) if isinstance(value, Mapping) else None
    return value


# --------------------------------------------------------------------------------------------------- vocab
class Vocab:
    """String -> int with index 0 reserved for unknown/default; new tokens are appended, never renumbered.

    ``max_size`` (unknown included) caps the vocabulary: tokens beyond it map to 0.
    """

    UNKNOWN = 0

    def __init__(self, tokens: Iterable[str] = (), max_size: int | None = None) -> None:
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be >= 1 (room for the unknown index), got {max_size}")
        self.max_size = max_size
        self._tokens: list[str] = []
        self._index: dict[str, int] = {}
        self._add(tokens)

    def _add(self, tokens: Iterable[str]) -> None:
        for token in tokens:
            if token in self._index:
                continue
            if self.max_size is not None and len(self) >= self.max_size:
                break
            self._index[token] = len(self._tokens) + 1
            self._tokens.append(token)

    def __len__(self) -> int:
        return len(self._tokens) + 1

    def __contains__(self, token: object) -> bool:
        return token in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self._tokens == other._tokens and self.max_size == other.max_size

    def __repr__(self) -> str:
        return f"Vocab({len(self)} entries, max_size={self.max_size})"

    @property
    def tokens(self) -> tuple[str, ...]:
        """Tokens in index order, starting at index 1."""
        return tuple(self._tokens)

    def index(self, token: str) -> int:
        return self._index.get(token, self.UNKNOWN)

    def lookup(self, tokens: Iterable[str]) -> np.ndarray:
        """int64 indices ``[n]``; unknown tokens map to 0."""
        get = self._index.get
        return np.fromiter((get(t, 0) for t in tokens), dtype=np.int64)

    def token(self, index: int) -> str | None:
        """The token at ``index``; None for 0 (unknown)."""
        return self._tokens[index - 1] if index > 0 else None

    def extended(self, tokens: Iterable[str]) -> Vocab:
        """A copy with unseen ``tokens`` appended (sorted, for determinism); existing indices are unchanged."""
        new = Vocab(self._tokens, self.max_size)
        new._add(sorted(set(tokens) - self._index.keys()))
        return new

    def retained(self, keep: np.ndarray) -> tuple[Vocab, np.ndarray]:
        """A compacted copy holding only the tokens whose index ``keep`` (bool ``[len(self)]``) marks, in their
        old order, and ``rows``: int64 ``[len(new)]``, the old index of every new index (``rows[0] = 0``).

        The one operation that renumbers: only for a new model version (:mod:`trainer.expiry`), whose tables are
        gathered with ``rows``; within a version indices never change.
        """
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self),):
            raise ValueError(f"keep must be a bool mask of shape ({len(self)},), got {keep.shape}")
        rows = np.flatnonzero(keep[1:]) + 1
        return Vocab([self._tokens[r - 1] for r in rows], self.max_size), np.concatenate([[0], rows]).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": list(self._tokens), "max_size": self.max_size}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Vocab:
        return cls(raw["tokens"], raw.get("max_size"))


# --------------------------------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class FeatureBatch:
    """Inputs of one tower for ``B`` rows, keyed by feature name.

    indices: ``[B]`` int64 (id, discrete and bucketised continuous features; 0 = unknown/masked);
    values: ``[B]`` float32 (standardised continuous features; 0 = the training mean);
    lists: ``[B, L]`` int64 (multi-valued and last-N features) with masks: ``[B, L]`` bool, True for real values.
    """

    indices: Mapping[str, Tensor] = field(default_factory=dict)
    values: Mapping[str, Tensor] = field(default_factory=dict)
    lists: Mapping[str, Tensor] = field(default_factory=dict)
    masks: Mapping[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        for group in (self.indices, self.values, self.lists):
            for t in group.values():
                return int(t.shape[0])
        return 0

    def select(self, rows: Tensor | np.ndarray | Sequence[int]) -> FeatureBatch:
        """Rows ``rows`` (int64 ``[n]``) of every feature; list features are trimmed to their widest row."""
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64)) if not isinstance(rows, Tensor) else rows
        lists, masks = {}, {}
        for name, values in self.lists.items():
            mask = self.masks[name][rows]
            width = int(mask.sum(dim=1).max()) if len(rows) else 0
            # Values are left-aligned in every table this module builds, so trimming keeps them all.
            lists[name], masks[name] = values[rows, :width], mask[:, :width]
        return FeatureBatch(
            {k: v[rows] for k, v in self.indices.items()},
            {k: v[rows] for k, v in self.values.items()},
            lists,
            masks,
        )

    def with_list(self, name: str, values: Tensor, mask: Tensor) -> FeatureBatch:
        """This batch with list feature ``name`` set: values ``[B, L]`` int64, mask ``[B, L]`` bool."""
        if values.shape != mask.shape or values.shape[0] != len(self):
            raise ValueError(
                f"{name}: expected values and mask [{len(self)}, L], got {tuple(values.shape)} and {tuple(mask.shape)}"
            )
        return replace(self, lists={**self.lists, name: values}, masks={**self.masks, name: mask})

    def with_index(self, name: str, index: Tensor) -> FeatureBatch:
        """This batch with index feature ``name`` replaced by ``index`` (``[B]`` int64)."""
        return replace(self, indices={**self.indices, name: index})

    def with_value(self, name: str, value: Tensor) -> FeatureBatch:
        return replace(self, values={**self.values, name: value})


UserBatch = FeatureBatch
ItemBatch = FeatureBatch


def _pack_lists(rows: Sequence[np.ndarray], max_len: int) -> tuple[Tensor, Tensor]:
    """Left-aligned ``[B, L]`` int64 values and bool mask from ragged rows (each cut to its last ``max_len``)."""
    width = min(max((len(r) for r in rows), default=0), max_len)
    values = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        r = r[-max_len:] if len(r) > max_len else r
        values[i, : len(r)] = r
        mask[i, : len(r)] = True
    return torch.from_numpy(values), torch.from_numpy(mask)


# --------------------------------------------------------------------------------------------------- defaults
def _long_tailed(values: np.ndarray) -> bool:
    """Non-negative with sample skewness > 2: log1p will make it closer to symmetric (prices, counts, tenures)."""
    if len(values) < 3 or values.min() < 0:
        return False
    std = values.std()
    return bool(std > 0 and (((values - values.mean()) / std) ** 3).mean() > 2.0)


def default_user_features(dataset: Dataset, last_n: int = 20) -> tuple[FeatureSpec, ...]:
    """User id; each ``discrete`` key (one-hot when it has at most 3 values); each ``multi`` key; each ``numeric``
    key (log-transformed when long-tailed); the last ``last_n`` clicks."""
    profiles = list(dataset.users.values())
    specs: list[FeatureSpec] = [IdFeature("user_id")]
    for key in sorted({k for p in profiles for k in p.discrete}):
        distinct = {p.discrete[key] for p in profiles if key in p.discrete}
        specs.append(DiscreteFeature(f"discrete.{key}", f"discrete.{key}", one_hot=4 if len(distinct) <= 3 else None))
    for key in sorted({k for p in profiles for k in p.multi}):
        specs.append(MultiValuedFeature(f"multi.{key}", f"multi.{key}"))
    for key in sorted({k for p in profiles for k in p.numeric}):
        values = np.array([p.numeric[key] for p in profiles if key in p.numeric], dtype=np.float64)
        specs.append(
            ContinuousFeature(f"numeric.{key}", f"numeric.{key}", "log" if _long_tailed(values) else "standard")
        )
    if last_n > 0:
        specs.append(LastNFeature("last_n", last_n, "item_id"))
    return tuple(specs)


def default_item_features(dataset: Dataset) -> tuple[FeatureSpec, ...]:
    """Item id, category, tags (multi-valued), each ``stats`` key (log-transformed when long-tailed)."""
    items = list(dataset.items.values())
    specs: list[FeatureSpec] = [
        IdFeature("item_id"),
        DiscreteFeature("category", "category"),
        MultiValuedFeature("tags", "tags"),
    ]
    for key in sorted({k for it in items for k in it.stats}):
        values = np.array([it.stats[key] for it in items if key in it.stats], dtype=np.float64)
        specs.append(ContinuousFeature(f"stats.{key}", f"stats.{key}", "log" if _long_tailed(values) else "standard"))
    return tuple(specs)


# --------------------------------------------------------------------------------------------------- encoder
def _tokens_of(spec: FeatureSpec, records: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for record in records:
        value = _read(record, spec.source)  # type: ignore[union-attr]
        if value is None:
            continue
        if isinstance(spec, MultiValuedFeature):
            out.extend(str(v) for v in value)
        else:
            out.append(str(value))
    return out


def _raw_numbers(spec: ContinuousFeature, records: Sequence[Any]) -> np.ndarray:
    """float64 ``[n]`` with NaN where the record lacks the value."""
    out = np.full(len(records), np.nan)
    for i, record in enumerate(records):
        value = _read(record, spec.source)
        if isinstance(value, int | float) and math.isfinite(value):
            out[i] = float(value)
    return out


class FeatureEncoder:
    """Turns user ids (+ profiles, + last-N clicks) and item ids (+ catalogue records) into :class:`FeatureBatch`."""

    def __init__(
        self,
        user_features: Sequence[FeatureSpec],
        item_features: Sequence[FeatureSpec],
        vocabs: Mapping[str, Mapping[str, Vocab]],
        stats: Mapping[str, Mapping[str, Mapping[str, Any]]],
    ) -> None:
        self.user_features: tuple[FeatureSpec, ...] = tuple(user_features)
        self.item_features: tuple[FeatureSpec, ...] = tuple(item_features)
        self._vocabs = {tower: dict(v) for tower, v in vocabs.items()}
        self._stats = {tower: {k: dict(s) for k, s in v.items()} for tower, v in stats.items()}
        for tower, specs in (("user", self.user_features), ("item", self.item_features)):
            self._check_specs(tower, specs)

    def _check_specs(self, tower: str, specs: tuple[FeatureSpec, ...]) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"{tower} feature names must be unique, got {names}")
        ids = [s for s in specs if isinstance(s, IdFeature)]
        if len(ids) != 1:
            raise ValueError(f"the {tower} tower needs exactly one IdFeature, got {len(ids)}")
        for spec in specs:
            if isinstance(spec, LastNFeature):
                if tower != "user":
                    raise ValueError(
                        f"LastNFeature {spec.name!r} belongs to the user tower, found in the {tower} tower"
                    )
                if spec.item_vocab not in self._vocabs.get("item", {}):
                    raise ValueError(
                        f"LastNFeature {spec.name!r} names item vocabulary {spec.item_vocab!r}, which does not exist"
                    )
            elif isinstance(spec, ContinuousFeature) and spec.name not in self._stats.get(tower, {}):
                raise ValueError(f"continuous {tower} feature {spec.name!r} has no fitted statistics")
            elif not isinstance(spec, ContinuousFeature) and spec.name not in self._vocabs.get(tower, {}):
                raise ValueError(f"{tower} feature {spec.name!r} has no vocabulary")

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        dataset: Dataset,
        user_features: Sequence[FeatureSpec] | None = None,
        item_features: Sequence[FeatureSpec] | None = None,
        *,
        last_n: int = 20,
    ) -> FeatureEncoder:
        """Vocabularies and statistics from ``dataset``; defaults from :func:`default_user_features` et al."""
        user_specs = tuple(user_features) if user_features is not None else default_user_features(dataset, last_n)
        item_specs = tuple(item_features) if item_features is not None else default_item_features(dataset)
        stats: dict[str, dict[str, dict[str, Any]]] = {"user": {}, "item": {}}
        vocabs: dict[str, dict[str, Vocab]] = {"user": {}, "item": {}}
        for tower, specs, records in (
            ("user", user_specs, list(dataset.users.values())),
            ("item", item_specs, list(dataset.items.values())),
        ):
            for spec in specs:
                if isinstance(spec, ContinuousFeature):
                    stats[tower][spec.name] = _fit_continuous(spec, _raw_numbers(spec, records))
                elif not isinstance(spec, LastNFeature):
                    vocabs[tower][spec.name] = Vocab(max_size=getattr(spec, "one_hot", None))
        # Fitting = extending empty vocabularies, so both number ids the same way.
        encoder = cls(user_specs, item_specs, vocabs, stats).extend(dataset)
        logger.info("feature encoder fitted: %s", encoder.describe())
        return encoder

    @staticmethod
    def _ids_in(tower: str, dataset: Dataset) -> set[str]:
        # Users get a row once they click (a profile-only user is served by the learned default row 0); items get
        # one as soon as they are in the catalogue, so a new item's id row exists before its first click.
        if tower == "user":
            return set(dataset.clicks.user.tolist())
        return set(dataset.items) | set(dataset.clicks.item.tolist())

    def extend(self, dataset: Dataset) -> FeatureEncoder:
        """A new encoder whose vocabularies also hold the ids and values of ``dataset``, appended after the
        existing ones (no index changes). Feature set and continuous statistics stay as fitted."""
        vocabs: dict[str, dict[str, Vocab]] = {"user": {}, "item": {}}
        for tower, specs, records in (
            ("user", self.user_features, list(dataset.users.values())),
            ("item", self.item_features, list(dataset.items.values())),
        ):
            for spec in specs:
                if isinstance(spec, IdFeature):
                    vocabs[tower][spec.name] = self._vocabs[tower][spec.name].extended(self._ids_in(tower, dataset))
                elif isinstance(spec, DiscreteFeature | MultiValuedFeature):
                    vocabs[tower][spec.name] = self._vocabs[tower][spec.name].extended(_tokens_of(spec, records))
        return FeatureEncoder(self.user_features, self.item_features, vocabs, self._stats)

    def retain_ids(self, keep: Mapping[str, np.ndarray]) -> tuple[FeatureEncoder, dict[str, np.ndarray]]:
        """A new encoder whose ID vocabularies keep only the ids ``keep[tower]`` marks (a bool mask over the
        tower's ID vocabulary; towers not in ``keep`` are unchanged) and, per tower, the old index of each new
        index (:meth:`Vocab.retained`). Other vocabularies and statistics are shared as they are."""
        vocabs = {tower: dict(v) for tower, v in self._vocabs.items()}
        rows: dict[str, np.ndarray] = {}
        for tower, mask in keep.items():
            name = self._id_spec(tower).name
            vocabs[tower][name], rows[tower] = self._vocabs[tower][name].retained(mask)
        return FeatureEncoder(self.user_features, self.item_features, vocabs, self._stats), rows

    # ------------------------------------------------------------------ access
    def vocab(self, tower: Literal["user", "item"], name: str) -> Vocab:
        try:
            return self._vocabs[tower][name]
        except KeyError:
            raise KeyError(f"no {tower} vocabulary {name!r}; have {sorted(self._vocabs.get(tower, {}))}") from None

    def stats(self, tower: Literal["user", "item"], name: str) -> dict[str, Any]:
        """Fitted statistics of a continuous feature: ``{"mean", "std"}`` or ``{"edges"}`` (a copy)."""
        return dict(self._stats[tower][name])

    def _id_spec(self, tower: str) -> IdFeature:
        specs = self.user_features if tower == "user" else self.item_features
        return next(s for s in specs if isinstance(s, IdFeature))

    @property
    def user_vocab(self) -> Vocab:
        return self._vocabs["user"][self._id_spec("user").name]

    @property
    def item_vocab(self) -> Vocab:
        return self._vocabs["item"][self._id_spec("item").name]

    @property
    def last_n(self) -> LastNFeature | None:
        return next((s for s in self.user_features if isinstance(s, LastNFeature)), None)

    def table_sizes(self, tower: Literal["user", "item"]) -> dict[str, int]:
        """Rows of every embedding table of a tower, by feature name (what the model must allocate)."""
        specs = self.user_features if tower == "user" else self.item_features
        sizes = {}
        for spec in specs:
            if isinstance(spec, LastNFeature):
                sizes[spec.name] = len(self._vocabs["item"][spec.item_vocab])
            elif isinstance(spec, ContinuousFeature):
                if spec.transform == "bucket":
                    sizes[spec.name] = spec.num_buckets + 1
            else:
                vocab = self._vocabs[tower][spec.name]
                sizes[spec.name] = vocab.max_size if vocab.max_size is not None else len(vocab)
        return sizes

    def describe(self) -> str:
        parts = []
        for tower in ("user", "item"):
            sizes = ", ".join(f"{k}={v}" for k, v in self.table_sizes(tower).items())
            parts.append(f"{tower}[{sizes}]")
        return " ".join(parts)

    # ------------------------------------------------------------------ encoding
    def _encode(
        self, tower: str, specs: Sequence[FeatureSpec], ids: Sequence[str], records: Sequence[Any]
    ) -> FeatureBatch:
        indices: dict[str, Tensor] = {}
        values: dict[str, Tensor] = {}
        lists: dict[str, Tensor] = {}
        masks: dict[str, Tensor] = {}
        for spec in specs:
            if isinstance(spec, IdFeature):
                indices[spec.name] = torch.from_numpy(self._vocabs[tower][spec.name].lookup(ids))
            elif isinstance(spec, DiscreteFeature):
                vocab = self._vocabs[tower][spec.name]
                raw = (_read(r, spec.source) for r in records)
                indices[spec.name] = torch.from_numpy(vocab.lookup("" if v is None else str(v) for v in raw))
            elif isinstance(spec, MultiValuedFeature):
                vocab = self._vocabs[tower][spec.name]
                rows = [vocab.lookup(str(v) for v in (_read(r, spec.source) or ())) for r in records]
                lists[spec.name], masks[spec.name] = _pack_lists(rows, spec.max_values)
            elif isinstance(spec, ContinuousFeature):
                x = _transform_continuous(spec, self._stats[tower][spec.name], _raw_numbers(spec, records))
                if spec.transform == "bucket":
                    indices[spec.name] = torch.from_numpy(x.astype(np.int64))
                else:
                    values[spec.name] = torch.from_numpy(x.astype(np.float32))
            elif isinstance(spec, LastNFeature):
                # Filled by the caller (with_list) from a trainer.history.ClickHistory; empty until then.
                lists[spec.name] = torch.zeros((len(ids), 0), dtype=torch.int64)
                masks[spec.name] = torch.zeros((len(ids), 0), dtype=torch.bool)
        return FeatureBatch(indices, values, lists, masks)

    def encode_items(self, item_ids: Sequence[str], catalogue: Mapping[str, Item]) -> ItemBatch:
        """Item-tower inputs for ``item_ids``; an id missing from ``catalogue`` gets default features."""
        return self._encode("item", self.item_features, item_ids, [catalogue.get(i) for i in item_ids])

    def encode_users(
        self,
        user_ids: Sequence[str],
        profiles: Mapping[str, UserProfile],
        history: Sequence[Sequence[str]] | tuple[Tensor, Tensor] | None = None,
    ) -> UserBatch:
        """User-tower inputs. ``history``: per user the clicked item ids (oldest first; the last N are used), or
        ``(values, mask)`` from :class:`trainer.history.ClickHistory`; None = no clicks known."""
        batch = self._encode("user", self.user_features, user_ids, [profiles.get(u) for u in user_ids])
        spec = self.last_n
        if spec is None or history is None:
            return batch
        if isinstance(history, tuple) and len(history) == 2 and isinstance(history[0], Tensor):
            return batch.with_list(spec.name, *history)
        vocab = self._vocabs["item"][spec.item_vocab]
        rows = [vocab.lookup(h) for h in history]  # type: ignore[arg-type]
        return batch.with_list(spec.name, *_pack_lists(rows, spec.n))

    def item_table(self, catalogue: Mapping[str, Item]) -> ItemBatch:
        """Inputs of every item in the vocabulary, row ``i`` = vocabulary index ``i`` (row 0: unknown)."""
        ids = ["", *self.item_vocab.tokens]
        batch = self.encode_items(ids, catalogue)
        return batch

    def user_table(self, profiles: Mapping[str, UserProfile]) -> UserBatch:
        """Profile inputs of every user in the vocabulary, row ``i`` = index ``i``; last-N left empty."""
        return self.encode_users(["", *self.user_vocab.tokens], profiles)

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> str:
        return json.dumps(
            {
                "format": ENCODER_FORMAT,
                "user_features": [_spec_to_dict(s) for s in self.user_features],
                "item_features": [_spec_to_dict(s) for s in self.item_features],
                "vocabs": {t: {k: v.to_dict() for k, v in vs.items()} for t, vs in self._vocabs.items()},
                "stats": self._stats,
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str) -> FeatureEncoder:
        raw = json.loads(text)
        if raw.get("format") != ENCODER_FORMAT:
            raise ValueError(f"encoder JSON has format {raw.get('format')!r}; this reader understands {ENCODER_FORMAT}")
        return cls(
            [_spec_from_dict(s) for s in raw["user_features"]],
            [_spec_from_dict(s) for s in raw["item_features"]],
            {t: {k: Vocab.from_dict(v) for k, v in vs.items()} for t, vs in raw["vocabs"].items()},
            raw["stats"],
        )


def _fit_continuous(spec: ContinuousFeature, raw: np.ndarray) -> dict[str, Any]:
    x = raw[np.isfinite(raw)]
    if spec.transform == "bucket":
        if spec.num_buckets < 2:
            raise ValueError(f"{spec.name}: num_buckets must be >= 2, got {spec.num_buckets}")
        qs = np.linspace(0.0, 1.0, spec.num_buckets + 1)[1:-1]
        edges = np.unique(np.quantile(x, qs)) if len(x) else np.zeros(0)
        return {"edges": edges.tolist()}
    if spec.transform == "log":
        x = np.log1p(np.maximum(x, 0.0))
    elif spec.transform != "standard":
        raise ValueError(f"{spec.name}: transform must be 'standard', 'log' or 'bucket', got {spec.transform!r}")
    mean = float(x.mean()) if len(x) else 0.0
    std = float(x.std()) if len(x) else 1.0
    return {"mean": mean, "std": std if std > 1e-12 else 1.0}


def _transform_continuous(spec: ContinuousFeature, stats: Mapping[str, Any], raw: np.ndarray) -> np.ndarray:
    """Standardised float64 ``[n]`` (missing -> 0), or bucket indices in ``1..num_buckets`` (missing -> 0)."""
    present = np.isfinite(raw)
    if spec.transform == "bucket":
        edges = np.asarray(stats["edges"], dtype=np.float64)
        buckets = 1 + np.searchsorted(edges, np.where(present, raw, 0.0), side="right")
        return np.where(present, buckets, 0)
    x = np.where(present, raw, 0.0)
    if spec.transform == "log":
        x = np.log1p(np.maximum(x, 0.0))
    z = np.clip((x - stats["mean"]) / stats["std"], -CONTINUOUS_CLIP, CONTINUOUS_CLIP)
    return np.where(present, z, 0.0)
