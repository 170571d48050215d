"""The model registry: immutable versions on disk and an atomically switched ``CURRENT`` pointer.

Layout::

    <root>/versions/<version_id>/   one complete version each (manifest.json + the files it lists)
    <root>/staging/                 versions being written; renamed into versions/ only when complete
    <root>/CURRENT                  {"version": id, "previous": [ids...], "updated_ms": ...}
    <root>/history.json             every promote / rollback, oldest first (an audit log; rollback does not need it)
    <root>/.lock                    serialises writers (promote, rollback, prune) across processes

Why readers never see a mix: a version directory appears under ``versions/`` by one ``rename`` of a
fully written and synced staging directory, and is never modified afterwards; ``CURRENT`` is a
small JSON file replaced by ``os.replace`` of a synced temporary file. A reader resolving
``CURRENT`` therefore gets either the old or the new id, and both name complete directories.

Rollback uses the ``previous`` stack stored inside ``CURRENT`` itself, so the pointer and the
rollback target change in the same atomic replace (a crash cannot leave one without the other);
``history.json`` is an audit log, also rewritten atomically (old entries + the new one).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming.archive import fsync_dir
from trainer.artifact import MANIFEST, read_manifest, verify_files

__all__ = ["ANY", "CurrentChanged", "Registry", "RegistryError", "VersionInfo"]

logger = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked (unknown version, nothing to roll back to, ...)."""


class CurrentChanged(RegistryError):
    """A conditional promotion found another current version than expected."""


ANY = object()  # promote(expect_current=ANY): whatever is current


@dataclass(frozen=True)
class VersionInfo:
    """One complete version: its id, directory, parent id and creation time (ms)."""

    version_id: str
    path: Path
    parent: str | None
    created_ms: int


def _check_id(version_id: str) -> str:
    if not isinstance(version_id, str) or not _ID_RE.match(version_id):
        raise RegistryError(f"version id must match {_ID_RE.pattern}, got {version_id!r}")
    return version_id


def _fsync_tree(path: Path) -> None:
    for sub in sorted(path.rglob("*")):
        if sub.is_file():
            with open(sub, "rb") as fh:
                os.fsync(fh.fileno())
    for sub in sorted(p for p in path.rglob("*") if p.is_dir()):
        fsync_dir(sub)
    fsync_dir(path)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class Registry:
    """Versions under ``root`` and the pointer to the one being served.

    ``keep``: how many versions :meth:`prune` keeps (newest by creation time); the current
    version, its parent and the rollback target are always kept besides.
    """

    def __init__(self, root: str | Path, *, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / "staging"
        self._pointer = self.root / "CURRENT"
        self._history = self.root / "history.json"
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(parents=True, exist_ok=True)

    # -- reading -------------------------------------------------------------------------------

    def path(self, version_id: str) -> Path:
        """The directory of a complete version; raises :class:`RegistryError` if there is none."""
        path = self.versions_dir / _check_id(version_id)
        if not (path / MANIFEST).is_file():
            raise RegistryError(f"no complete version {version_id!r} in {self.versions_dir}")
        return path

    def current(self) -> str | None:
        """The id of the promoted version, or ``None`` before the first promotion."""
        state = self._read_pointer()
        return state["version"] if state else None

    def previous(self) -> str | None:
        """The version :meth:`rollback` would restore, or ``None``."""
        state = self._read_pointer()
        return state["previous"][0] if state and state["previous"] else None

    def list(self) -> list[VersionInfo]:
        """Complete versions (a directory with a readable manifest), oldest first."""
        out = []
        for path in self.versions_dir.iterdir():
            if not path.is_dir() or not _ID_RE.match(path.name):
                continue
            try:
                manifest = read_manifest(path)
            except (OSError, ValueError) as exc:
                logger.debug("skipping %s: %s", path, exc)
                continue
            out.append(VersionInfo(path.name, path, manifest.get("parent"), int(manifest.get("created_ms", 0))))
        return sorted(out, key=lambda v: (v.created_ms, v.version_id))

    def history(self) -> list[dict[str, Any]]:
        """Every promote / rollback so far, oldest first."""
        if not self._history.exists():
            return []
        with open(self._history, encoding="utf-8") as fh:
            return json.load(fh)

    def _read_pointer(self) -> dict[str, Any] | None:
        try:
            with open(self._pointer, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None

    # -- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def new_version(self, version_id: str) -> Iterator[Path]:
        """Yield an empty staging directory; on a clean exit it becomes ``versions/<version_id>``.

        The block must write ``manifest.json`` (e.g. with :func:`trainer.artifact.save_version`); the
        files are synced and checked against it before the directory is renamed into place. On an
        exception the staging directory is removed and nothing becomes visible.
        """
        _check_id(version_id)
        final = self.versions_dir / version_id
        if final.exists():
            raise RegistryError(f"version {version_id!r} already exists at {final}")
        staging = self.staging_dir / f"{version_id}.{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            yield staging
            manifest = read_manifest(staging)
            if manifest.get("version_id") != version_id:
                raise RegistryError(f"manifest names version {manifest.get('version_id')!r}, expected {version_id!r}")
            verify_files(staging, manifest)
            _fsync_tree(staging)
            os.rename(staging, final)  # fails (ENOTEMPTY / EEXIST) rather than merge into an existing version
            fsync_dir(self.versions_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("registered version %s", version_id)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def promote(self, version_id: str, *, reason: str = "", expect_current: str | None | object = ANY) -> None:
        """Make ``version_id`` current. Its files are checked against the manifest first.

        ``expect_current``: promote only if this is still the current version (None: no version is current), as
        one step under the lock; raises :class:`CurrentChanged` otherwise. The nightly job passes the version it
        started from, so that a rollback or promotion by hand during its run is not silently undone.
        """
        path = self.path(version_id)
        verify_files(path, read_manifest(path))
        with self._locked():
            state = self._read_pointer()
            old = state["version"] if state else None
            if expect_current is not ANY and old != expect_current:
                raise CurrentChanged(f"current version is {old!r}, not {expect_current!r}: {version_id} not promoted")
            if old == version_id:
                logger.info("version %s is already current", version_id)
                return
            previous = ([old] if old else []) + (state["previous"] if state else [])
            self._switch(version_id, previous[: self.keep], action="promote", old=old, reason=reason)

    def rollback(self, *, reason: str = "") -> str:
        """Make the previously promoted version current again; returns its id."""
        with self._locked():
            state = self._read_pointer()
            if not state or not state["previous"]:
                raise RegistryError(f"nothing to roll back to: no version was current before {self.current()!r}")
            stack = list(state["previous"])
            while stack:
                target = stack.pop(0)
                if (self.versions_dir / target / MANIFEST).is_file():
                    self._switch(target, stack, action="rollback", old=state["version"], reason=reason)
                    return target
                logger.warning("rollback skips %s: it is no longer on disk", target)
            raise RegistryError(f"nothing to roll back to: every earlier version of {state['version']!r} was pruned")

    def _switch(self, version_id: str, previous: list[str], *, action: str, old: str | None, reason: str) -> None:
        now = int(time.time() * 1000)
        _write_json_atomic(self._pointer, {"version": version_id, "previous": previous, "updated_ms": now})
        entry = {"ts_ms": now, "action": action, "version": version_id, "from": old, "reason": reason}
        _write_json_atomic(self._history, [*self.history(), entry])
        logger.info("%s: current version %s -> %s%s", action, old, version_id, f" ({reason})" if reason else "")

    def prune(self) -> list[str]:
        """Delete all but the newest ``keep`` versions, never current, its parent or the rollback target.

        Also removes staging directories left by writers that crashed. Returns the deleted ids.
        """
        with self._locked():
            state = self._read_pointer()
            protected = set()
            if state:
                protected.add(state["version"])
                protected.update(state["previous"][:1])
                parent = read_manifest(self.path(state["version"])).get("parent")
                if parent:
                    protected.add(parent)
            versions = self.list()
            keep = {v.version_id for v in versions[-self.keep :]} | protected
            deleted = []
            for v in versions:
                if v.version_id not in keep:
                    # Rename out of versions/ first so a half-deleted directory is never listed.
                    doomed = self.staging_dir / f"{v.version_id}.deleting.{uuid.uuid4().hex[:8]}"
                    os.rename(v.path, doomed)
                    shutil.rmtree(doomed)
                    deleted.append(v.version_id)
            self._clean_staging()
        if deleted:
            logger.info("pruned versions %s", deleted)
        return deleted

    def _clean_staging(self) -> None:
        # Only under the lock, and only directories older than an hour: a writer may be mid-write.
        cutoff = time.time() - 3600
        for path in self.staging_dir.iterdir():
            if ".deleting." in path.name or path.stat().st_mtime < cutoff:
                shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ command line
def _utc(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000))


def _summary(info: VersionInfo, current: str | None, target: str | None) -> dict[str, Any]:
    manifest = read_manifest(info.path)
    metrics = manifest.get("metrics", {})
    gate = metrics.get("gate") or {}
    holdout = metrics.get("holdout") or {}
    recall = {k: v for k, v in holdout.items() if k.startswith("recall@") and not k.endswith("_se")}
    return {
        "version": info.version_id,
        "current": info.version_id == current,
        "rollback_target": info.version_id == target,
        "parent": info.parent,
        "created_ms": info.created_ms,
        "data_cutoff_ms": manifest.get("data_cutoff_ms"),
        "day": metrics.get("day"),
        "holdout": recall,
        "gate_accepted": gate.get("accepted"),
    }


def cmd_versions(args: argparse.Namespace) -> int:
    registry = _open(args.models)
    if registry is None:
        return 2
    current, target = registry.current(), registry.previous()
    rows = [_summary(info, current, target) for info in registry.list()]
    if args.json:
        print(json.dumps({"current": current, "rollback_target": target, "versions": rows}, indent=1))
        return 0
    print(
        f"{'':2}{'version':<24} {'parent':<24} {'data cutoff (UTC)':<17} {'created (UTC)':<17} {'held-back':<16} gate"
    )
    for row in rows:
        mark = "*" if row["current"] else ("<" if row["rollback_target"] else "")
        recall = ", ".join(f"{k} {v:.4f}" for k, v in row["holdout"].items() if isinstance(v, int | float)) or "-"
        gate = {True: "passed", False: "refused", None: "-"}[row["gate_accepted"]]
        print(
            f"{mark:<2}{row['version']:<24} {row['parent'] or '-':<24} {_utc(row['data_cutoff_ms']):<17} "
            f"{_utc(row['created_ms']):<17} {recall:<16} {gate}"
        )
    print("* current, < rollback target" if rows else f"no versions in {registry.versions_dir}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    return _switch_by_hand(args, lambda registry: registry.rollback(reason=args.reason), "rolled back")


def cmd_promote(args: argparse.Namespace) -> int:
    def promote(registry: Registry) -> str:
        registry.promote(args.version, reason=args.reason)
        return args.version

    return _switch_by_hand(args, promote, "promoted")


def _switch_by_hand(args: argparse.Namespace, switch: Callable[[Registry], str], done: str) -> int:
    """Run ``switch`` on the registry at ``--models``; print ``old -> new``, or exit 2 with the reason."""
    registry = _open(args.models)
    if registry is None:
        return 2
    old = registry.current()
    try:
        new = switch(registry)
    except (RegistryError, ValueError) as exc:  # nothing to roll back to, unknown version, damaged files
        logger.error("%s", exc)
        return 2
    print(f"{done}: {old} -> {new}")
    return 0


def _open(root: Path) -> Registry | None:
    if not (root / "versions").is_dir():
        logger.error("no model registry at %s (expected %s)", root, root / "versions")
        return None
    return Registry(root)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``versions``, ``rollback`` and ``promote`` on the ``python -m trainer`` command line."""
    models = argparse.ArgumentParser(add_help=False)
    models.add_argument(
        "--models", type=Path, default=Path("artifacts/models"), help="model registry root (default artifacts/models)"
    )
    p = subparsers.add_parser(
        "versions", parents=[models], help="list the model versions: current, rollback target, held-back recall, gate"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_versions)
    p = subparsers.add_parser(
        "rollback", parents=[models], help="make the previously promoted version current again (workers follow)"
    )
    p.add_argument("--reason", default="manual rollback", help="recorded in history.json")
    p.set_defaults(run=cmd_rollback)
    p = subparsers.add_parser(
        "promote", parents=[models], help="make a version current by hand (after --no-promote, or to roll forward)"
    )
    p.add_argument("version", help="the version id (see `versions`)")
    p.add_argument("--reason", default="manual promotion", help="recorded in history.json")
    p.set_defaults(run=cmd_promote)
