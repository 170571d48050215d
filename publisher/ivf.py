"""An inverted-file item index (``IndexIVFFlat``): approximate search whose vectors can be removed in place.

Items are assigned to the nearest of ``nlist`` centroids (k-means over the vectors at training time); a query
scans the ``nprobe`` lists nearest to it. Unlike HNSW, an IVF index deletes for real: with a hash-table direct
map, ``remove_ids`` drops a vector from its list, so nothing dead is ever scanned or needs hiding. Its cost
is that the centroids describe the vectors they were trained on: the index retrains (a rebuild from the live
vectors) once more than ``rebuild_fraction`` of its size was upserted since training (a model switch
rewrites every item), or once it has grown to 4 times its trained size.

``nlist`` defaults to ``4·sqrt(n)`` at training, capped by ``n / 39`` (faiss wants about 39 training
points per centroid), so a catalogue under 78 items is one list: exact search. Recall against ``nprobe`` is
measured in ``bench/serving_latency.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import faiss
import numpy as np

from publisher.index import LabelledIndex, _dedupe

__all__ = ["IVFIndex"]

logger = logging.getLogger(__name__)


def _nlist_for(n: int) -> int:
    return max(1, min(int(4 * math.sqrt(n)), n // 39, 65_536))


class IVFIndex(LabelledIndex):
    """Approximate inner-product search over ``nlist`` inverted lists, ``nprobe`` of them scanned per query."""

    kind = "ivf"

    def __init__(self, dim: int, *, nprobe: int = 32, rebuild_fraction: float = 0.5) -> None:
        super().__init__(dim)
        if nprobe < 1 or not 0 < rebuild_fraction:
            raise ValueError(f"expected nprobe >= 1 and rebuild_fraction > 0, got {nprobe} and {rebuild_fraction}")
        self.nprobe = nprobe
        self.rebuild_fraction = rebuild_fraction
        self._index: faiss.IndexIVFFlat | None = None
        self._trained_size = 0
        self._churn = 0  # vectors upserted since training

    @property
    def nlist(self) -> int:
        return self._index.nlist if self._index is not None else 0

    def _train(self, vectors: np.ndarray) -> faiss.IndexIVFFlat:
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, _nlist_for(len(vectors)), faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True  # the index frees the quantizer
        quantizer.this.disown()
        index.cp.seed = 1234
        index.train(vectors)
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # removal and reconstruction by id
        self._trained_size = len(vectors)
        self._churn = 0
        return index

    def upsert(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        ids, x = _dedupe(ids, self._vectors(ids, vectors))
        if not ids:
            return
        self.remove([i for i in ids if i in self._labels])
        fresh = self._index is None
        if fresh:
            self._index = self._train(x)
        self._index.add_with_ids(x, self._assign(ids))
        if not fresh:  # the vectors trained on are what the centroids describe, not churn
            self._churn += len(ids)
        if self._churn > self.rebuild_fraction * max(self._trained_size, 1) or len(self) > 4 * self._trained_size:
            self.rebuild()

    def remove(self, ids: Iterable[str]) -> int:
        labels = self._forget(ids)
        if len(labels) and self._index is not None:
            self._index.remove_ids(labels)
        return len(labels)

    def rebuild(self) -> None:
        """Retrain the centroids on the live vectors and re-add them (labels and ids kept)."""
        if self._index is None or not self._labels:
            return
        labels = np.fromiter(self._names, dtype=np.int64, count=len(self._names))
        vectors = self._index.reconstruct_batch(labels)
        logger.info("retraining IVF index on %d vectors (trained on %d)", len(labels), self._trained_size)
        index = self._train(vectors)
        index.add_with_ids(vectors, labels)
        self._index = index

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        q = self._queries(queries)
        if self._index is None or not self._labels:
            return self._empty(q, k)
        params = faiss.SearchParametersIVF()
        params.nprobe = min(self.nprobe, self._index.nlist)
        distances, labels = self._index.search(q, k, params=params)
        return self._pack_results(distances, labels, self._names, k)

    def _export(self) -> tuple[dict[str, Any], faiss.Index]:
        if self._index is None:
            raise ValueError("an IVF index with no vectors has no trained centroids to save")
        header = {
            **self._label_header(),
            "params": {"nprobe": self.nprobe, "rebuild_fraction": self.rebuild_fraction},
            "trained_size": self._trained_size,
            "churn": self._churn,
        }
        return header, self._index

    @classmethod
    def _restore(cls, header: dict[str, Any], index: faiss.Index) -> IVFIndex:
        out = cls(header["dim"], **header["params"])
        out._index = index if isinstance(index, faiss.IndexIVFFlat) else faiss.downcast_index(index)
        out._owner = index  # a downcast view does not own the memory: keep the owner alive with it
        out._restore_labels(header)
        out._trained_size, out._churn = header["trained_size"], header["churn"]
        return out
