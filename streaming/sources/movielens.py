"""MovieLens-100K as a replayable event source, from the copy that the RecBole wheel ships.

:func:`fetch` downloads the ``recbole==1.2.1`` wheel with pip (never importing it), checks the
SHA-256 of the three data files and moves them into ``<data_dir>/ml-100k/`` in one rename, so an
interrupted fetch never leaves a half dataset behind. :class:`MovieLens100K` reads RecBole's
atomic files (a tab-separated table whose header names each column's type, ``user_id:token``) and
replays them as the project's events: profiles and catalogue first, then every rating, in time
order, as an impression immediately followed by the click of the same request.

A rating is treated as a click: MovieLens records what a user chose to rate, which is the closest
thing it has to a retrieval positive. It has no record of what was shown and not chosen, so the
only impressions it can honestly produce are the ones its clicks imply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from streaming.events import Click, Event, Impression, Item, UserProfile

__all__ = [
    "DATASET_FILES",
    "RECBOLE_VERSION",
    "RATING_DTYPE",
    "FetchError",
    "MovieLens100K",
    "fetch",
    "is_complete",
]

logger = logging.getLogger(__name__)

RECBOLE_VERSION = "1.2.1"
DATASET_DIR = "ml-100k"
_WHEEL_PREFIX = "recbole/dataset_example/ml-100k/"
# SHA-256 of the files inside recbole-1.2.1-py3-none-any.whl; the wheel is pinned, so they never change.
DATASET_FILES: Mapping[str, str] = MappingProxyType(
    {
        "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
        "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
        "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    }
)
_MAX_FILE_BYTES = 64 * 1024 * 1024  # refuse absurd members (the largest real one is ~2 MB)
_PIP_TIMEOUT_S = 600

RATING_DTYPE = np.dtype([("user_id", np.int64), ("item_id", np.int64), ("rating", np.float64), ("ts", np.int64)])

# MovieLens-1M's published age groups (its README: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+); 100K
# records exact ages, bucketised here so the user tower gets both the raw value and a coarse category.
_AGE_BUCKETS = ((18, "under18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))
_OLDEST_BUCKET = "56+"
_NO_GENRE = "unknown"


class FetchError(RuntimeError):
    """The dataset could not be downloaded or did not contain what was expected."""


def is_complete(root: Path | str) -> bool:
    """Whether ``root`` holds all three data files, each non-empty.

    :func:`fetch` only ever creates the directory by renaming a finished one into place, so a
    directory missing a file was made some other way (or by hand) and must not be trusted.
    """
    root = Path(root)
    return all((root / name).is_file() and (root / name).stat().st_size > 0 for name in DATASET_FILES)


def fetch(data_dir: Path | str, wheel: Path | str | None = None) -> Path:
    """Return ``<data_dir>/ml-100k``, downloading it from the RecBole wheel if it is not complete.

    ``wheel``: a ``recbole-1.2.1`` wheel already on disk (for machines without PyPI); ``None``
    downloads it with ``pip download`` into a temporary directory.
    """
    data_dir = Path(data_dir)
    target = data_dir / DATASET_DIR
    if is_complete(target):
        logger.info("MovieLens-100K already at %s", target)
        return target
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ml-100k-fetch-", dir=data_dir) as tmp:
        staging = Path(tmp) / DATASET_DIR
        if wheel is None:
            wheel = _download_wheel(Path(tmp))
        _extract(Path(wheel), staging)
        if target.exists() and not is_complete(target):
            logger.warning("%s is incomplete (%s); replacing it", target, sorted(p.name for p in target.iterdir()))
            shutil.rmtree(target)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished first; its copy passed the same checks, so keep it.
            if not is_complete(target):
                raise
            logger.info("another fetch completed %s first; keeping it", target)
    logger.info("MovieLens-100K ready at %s", target)
    return target


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"recbole=={RECBOLE_VERSION}"]
    cmd += ["-d", str(dest)]
    logger.info("downloading the recbole==%s wheel for MovieLens-100K: %s", RECBOLE_VERSION, " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"could not run pip to download recbole=={RECBOLE_VERSION}: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise FetchError(
            f"`{' '.join(cmd)}` exited with {done.returncode}; expected it to download recbole=={RECBOLE_VERSION} "
            f"(is PyPI reachable and pip installed in this environment?)\n{tail}"
        )
    wheels = sorted(dest.glob(f"recbole-{RECBOLE_VERSION}-*.whl"))
    if len(wheels) != 1:
        raise FetchError(
            f"expected one recbole-{RECBOLE_VERSION} wheel in {dest}, found {[p.name for p in dest.iterdir()]}"
        )
    logger.info("downloaded %s (%d bytes)", wheels[0].name, wheels[0].stat().st_size)
    return wheels[0]


def _extract(wheel: Path, staging: Path) -> None:
    """Copy only the three data files out of the wheel into ``staging``, checking each one's SHA-256."""
    staging.mkdir(parents=True)
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise FetchError(f"{wheel} is not a readable wheel (zip archive): {exc}") from exc
    with archive:
        members = set(archive.namelist())
        for name, expected in DATASET_FILES.items():
            member = _WHEEL_PREFIX + name
            if member not in members:
                found = sorted(m for m in members if "ml-100k" in m)
                raise FetchError(f"{wheel.name} has no {member}; its ml-100k entries are {found}")
            if archive.getinfo(member).file_size > _MAX_FILE_BYTES:
                raise FetchError(f"{member} claims {archive.getinfo(member).file_size} bytes, limit {_MAX_FILE_BYTES}")
            data = archive.read(member)
            digest = hashlib.sha256(data).hexdigest()
            if digest != expected:
                raise FetchError(f"{member} in {wheel.name} has sha256 {digest}, expected {expected}")
            (staging / name).write_bytes(data)
            logger.info("extracted %s (%d bytes)", name, len(data))


def _read_atomic(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Read one RecBole atomic file: header ``name:type`` fields, tab-separated, UTF-8.

    ``token`` → ``str``, ``float`` → ``float``, ``token_seq`` → tuple of space-separated tokens,
    ``float_seq`` → tuple of floats. An empty field (or a missing trailing one) is ``None`` for
    scalars and ``()`` for sequences; titles are never quoted, so quotes and commas are plain text.
    """
    with path.open(encoding="utf-8", newline="") as fh:
        header = fh.readline().rstrip("\r\n").split("\t")
        columns: list[tuple[str, str]] = []
        for field in header:
            name, sep, kind = field.partition(":")
            if not sep or kind not in ("token", "token_seq", "float", "float_seq"):
                raise ValueError(
                    f"{path}: header field {field!r} is not name:type with type token/token_seq/float/float_seq"
                )
            columns.append((name, kind))
        rows = []
        for lineno, line in enumerate(fh, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            values = line.split("\t")
            if len(values) > len(columns):
                raise ValueError(f"{path}:{lineno}: expected {len(columns)} tab-separated fields, got {len(values)}")
            values += [""] * (len(columns) - len(values))
            row = {}
            for (name, kind), raw in zip(columns, values, strict=True):
                try:
                    row[name] = _convert(raw, kind)
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: column {name}:{kind} expected a number, got {raw!r}") from None
            rows.append(row)
    return [name for name, _ in columns], rows


def _convert(raw: str, kind: str) -> Any:
    if kind == "token":
        return raw.strip() or None
    if kind == "float":
        return float(raw) if raw.strip() else None
    parts = raw.split()
    return tuple(float(p) for p in parts) if kind == "float_seq" else tuple(parts)


def _number(value: str | None) -> float | None:
    """A token that should hold a number (release year, age); ``None`` when it does not (``"V"``, ``"unkonwn"``)."""
    if value is None:
        return None
    try:
        out = float(value)
    except ValueError:
        return None
    return out if math.isfinite(out) else None


def _age_bucket(age: float) -> str:
    for upper, label in _AGE_BUCKETS:
        if age < upper:
            return label
    return _OLDEST_BUCKET


def _require(path: Path, names: list[str], needed: tuple[str, ...]) -> None:
    missing = [n for n in needed if n not in names]
    if missing:
        raise ValueError(f"{path}: expected columns {list(needed)}, missing {missing} (header has {names})")


def _int_id(value: Any, what: str, path: Path) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {what} must be an integer token, got {value!r}") from None


class MovieLens100K:
    """The ml-100k directory returned by :func:`fetch`, parsed and replayable as events.

    Users are ``"u<id>"``, items ``"i<id>"``; event times are ``ts_ms = timestamp seconds * 1000``.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if not is_complete(self.root):
            raise FileNotFoundError(f"{self.root} should hold non-empty {sorted(DATASET_FILES)}; run fetch() first")
        self._ratings = self._read_ratings(self.root / "ml-100k.inter")
        self._first_ts = int(self._ratings["ts"][0]) if len(self._ratings) else 0
        self._item_rows = self._read_table(self.root / "ml-100k.item", ("item_id", "class"))
        self._user_rows = self._read_table(
            self.root / "ml-100k.user", ("user_id", "age", "gender", "occupation", "zip_code")
        )
        logger.info(
            "MovieLens-100K at %s: %d users, %d items, %d ratings",
            self.root,
            len(self._user_rows),
            len(self._item_rows),
            len(self._ratings),
        )

    @staticmethod
    def _read_table(path: Path, needed: tuple[str, ...]) -> list[dict[str, Any]]:
        names, rows = _read_atomic(path)
        _require(path, names, needed)
        return rows

    @staticmethod
    def _read_ratings(path: Path) -> np.ndarray:
        names, rows = _read_atomic(path)
        _require(path, names, ("user_id", "item_id", "rating", "timestamp"))
        out = np.empty(len(rows), dtype=RATING_DTYPE)
        for i, row in enumerate(rows):
            if row["rating"] is None or row["timestamp"] is None:
                raise ValueError(f"{path}: rating {i + 1} has no rating or timestamp: {row}")
            if not float(row["timestamp"]).is_integer():
                raise ValueError(
                    f"{path}: rating {i + 1}: expected a timestamp in whole seconds, got {row['timestamp']}"
                )
            out[i] = (
                _int_id(row["user_id"], "user_id", path),
                _int_id(row["item_id"], "item_id", path),
                row["rating"],
                int(row["timestamp"]),
            )
        # Stable, so ratings with the same second keep their file order.
        out = out[np.argsort(out["ts"], kind="stable")]
        out.flags.writeable = False
        return out

    def _first_seen(self, field: str) -> dict[int, int]:
        """Earliest rating time (seconds) per user or item id; the first occurrence in time order."""
        ids, first = np.unique(self._ratings[field], return_index=True)
        return dict(zip(ids.tolist(), self._ratings["ts"][first].tolist(), strict=True))

    def ratings(self) -> np.ndarray:
        """All ratings as a read-only structured array (:data:`RATING_DTYPE`), sorted by ``ts`` (seconds)."""
        return self._ratings

    def titles(self) -> dict[str, str]:
        """Movie titles by item id (``"i1"`` → ``"Toy Story"``), for showing recommendations to a person."""
        path = self.root / "ml-100k.item"
        return {
            f"i{_int_id(r['item_id'], 'item_id', path)}": " ".join(r.get("movie_title") or ()) for r in self._item_rows
        }

    def items(self) -> list[Item]:
        """The catalogue in file order.

        ``category`` = first genre, ``tags`` = all genres, ``stats`` = ``{"release_year": y}`` when the
        year is a number (two rows hold ``"unkonwn"`` and ``"V"``). ``created_ms`` and ``ts_ms`` are the
        item's first rating (the dataset's first rating for an item nobody rated).
        """
        path = self.root / "ml-100k.item"
        first = self._first_seen("item_id")
        out = []
        for row in self._item_rows:
            item = _int_id(row["item_id"], "item_id", path)
            genres = tuple(row["class"])
            year = _number(row.get("release_year"))
            created_ms = first.get(item, self._first_ts) * 1000
            out.append(
                Item(
                    item_id=f"i{item}",
                    category=genres[0] if genres else _NO_GENRE,
                    tags=genres,
                    stats={} if year is None else {"release_year": year},
                    created_ms=created_ms,
                    ts_ms=created_ms,
                )
            )
        return out

    def users(self) -> list[UserProfile]:
        """User profiles in file order; empty fields are left out rather than invented.

        ``discrete``: gender, occupation, zip_prefix (first character: the US region digit, or the
        Canadian province letter for the few Canadian codes), age_bucket; ``numeric``: age.
        ``ts_ms`` is the user's first rating (the dataset's first rating for a user with none).
        """
        path = self.root / "ml-100k.user"
        first = self._first_seen("user_id")
        out = []
        for row in self._user_rows:
            user = _int_id(row["user_id"], "user_id", path)
            discrete = {k: row[k] for k in ("gender", "occupation") if row[k]}
            if row["zip_code"]:
                discrete["zip_prefix"] = row["zip_code"][0].upper()
            numeric = {}
            age = _number(row["age"])
            if age is not None:
                discrete["age_bucket"] = _age_bucket(age)
                numeric["age"] = age
            ts_ms = first.get(user, self._first_ts) * 1000
            out.append(UserProfile(user_id=f"u{user}", discrete=discrete, numeric=numeric, ts_ms=ts_ms))
        return out

    def events(self, min_rating: float = 0.0) -> Iterator[Event]:
        """Replay the dataset in non-decreasing ``ts_ms`` order.

        First every :class:`UserProfile`, then every :class:`Item`, all stamped with the first
        rating's time (their ``created_ms`` still says when the item was first rated). Then, for each
        rating ``>= min_rating`` in time order, an :class:`Impression` at position 0 immediately
        followed by the :class:`Click` of the same request ``"ml-<user>-<item>-<ts seconds>"``: a
        click implies its item was shown.
        """
        start_ms = self._first_ts * 1000
        for user in self.users():
            yield dataclasses.replace(user, ts_ms=start_ms)
        for item in self.items():
            yield dataclasses.replace(item, ts_ms=start_ms)
        kept = self._ratings[self._ratings["rating"] >= min_rating]
        logger.info("replaying %d of %d ratings (rating >= %g)", len(kept), len(self._ratings), min_rating)
        for user, item, ts in zip(kept["user_id"].tolist(), kept["item_id"].tolist(), kept["ts"].tolist(), strict=True):
            user_id, item_id, ts_ms = f"u{user}", f"i{item}", ts * 1000
            request_id = f"ml-{user}-{item}-{ts}"
            yield Impression(user_id, item_id, request_id, 0, ts_ms)
            yield Click(user_id, item_id, request_id, ts_ms)
