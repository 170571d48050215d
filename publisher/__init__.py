"""Periodic, versioned publishes of embeddings to the key-value store.

- :mod:`publisher.records`: what a version carries (:class:`Publish`, :class:`Meta`, rows) and its byte encoding.
- :mod:`publisher.store`: the KV contract (:class:`Store`, :class:`StoreView`) over RocksDB or memory;
  serving reads it through :class:`RocksSecondary`.
- :mod:`publisher.source`: the :class:`ChangeSource` protocol the learner implements; in-memory sources.
- :mod:`publisher.publish`: the :class:`Publisher` loop; :mod:`publisher.metrics` its Prometheus metrics.
- :mod:`publisher.index`: the item index (flat, HNSW), its snapshots and catch-up from the store.
- :mod:`publisher.fanout`: the compacted Kafka topic that feeds any number of serving replicas.
"""
