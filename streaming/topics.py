"""The event topics and their creation.

impressions, clicks and users are keyed by ``user_id`` and created with the same partition count,
so one user's events land on the same partition number of each topic (co-partitioning): the worker
that owns partition p holds every piece of state of the users hashed to p. ``items`` and ``users``
are compacted (the latest record per key is what matters). ``deadletter`` keeps what failed
validation, with the reason in a header. ``item-grads`` and ``item-rows`` carry the item path of a scaled-out
worker group (:mod:`streaming.item_rows`); ``item-rows`` is compacted, being the item owners' changelog.
``user-state`` is the workers' changelog of their partitions' user state (:mod:`streaming.changelog`; compacted: the
latest value of each state key is the state), which the publisher's mirror follows (:mod:`publisher.changelog_source`).
"""

from __future__ import annotations

import logging
import time

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streaming.access import diagnose, is_bootstrap_failure
from streaming.events import Click, Event, Impression, Item, UserProfile
from streaming.lifecycle import KafkaAuthFailed, KafkaStalled
from streaming.settings import KafkaSettings

__all__ = [
    "DEADLETTER",
    "EVENT_TOPICS",
    "ITEM_PATH_TOPICS",
    "SCALE_OUT_TOPICS",
    "USER_STATE_TOPIC",
    "connect_admin",
    "ensure_topics",
    "topic_for",
    "type_for_topic",
    "wait_for_metadata",
]

logger = logging.getLogger(__name__)

EVENT_TOPICS: dict[type, str] = {Impression: "impressions", Click: "clicks", Item: "items", UserProfile: "users"}
DEADLETTER = "deadletter"
ITEM_PATH_TOPICS = ("item-grads", "item-rows")
USER_STATE_TOPIC = "user-state"
# What a group of several workers needs besides the event topics.
SCALE_OUT_TOPICS = (*ITEM_PATH_TOPICS, USER_STATE_TOPIC)
COMPACTED = {"items", "users", "item-rows", USER_STATE_TOPIC}


def topic_for(event: Event, settings: KafkaSettings) -> str:
    """The full topic name an event belongs on."""
    return settings.topic(EVENT_TOPICS[type(event)])


def type_for_topic(topic: str, settings: KafkaSettings) -> type | None:
    """The event type a topic carries, or ``None`` for topics outside the contract."""
    for cls, name in EVENT_TOPICS.items():
        if settings.topic(name) == topic:
            return cls
    return None


def ensure_topics(
    settings: KafkaSettings, *, timeout_s: float = 30.0, names: tuple[str, ...] | None = None
) -> list[str]:
    """Create the event and dead-letter topics (or ``names``) if missing; return the full names. Idempotent."""
    names = list(names) if names is not None else [*EVENT_TOPICS.values(), DEADLETTER]
    deadline = time.monotonic() + timeout_s
    admin = connect_admin(settings, "freshtower-admin", deadline)
    try:
        existing = set(admin.list_topics())
        new = []
        for name in names:
            full = settings.topic(name)
            if full in existing:
                continue
            configs = {"retention.ms": str(settings.retention_ms)}
            if name in COMPACTED:
                configs = {"cleanup.policy": "compact"}
            new.append(NewTopic(full, settings.partitions, settings.replication_factor, topic_configs=configs))
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass  # another process created them between list and create
            logger.info("created topics %s", [t.name for t in new])
        wait_for_metadata(admin, [settings.topic(n) for n in names], deadline)
    finally:
        admin.close()
    return [settings.topic(n) for n in names]


def connect_admin(settings: KafkaSettings, client_id: str, deadline: float) -> KafkaAdminClient:
    """An admin client, retrying until ``deadline`` (time.monotonic()) while the broker is not up yet.

    This is the first connection every process makes, so it is where a refusal is told apart from an outage:
    a cluster that refuses the credentials or certificate raises :class:`~streaming.lifecycle.KafkaAuthFailed`
    at once (no retry storm); one that stays unreachable raises :class:`~streaming.lifecycle.KafkaStalled`."""
    while True:
        try:
            remaining_ms = max(1000, int((deadline - time.monotonic()) * 1000))
            return KafkaAdminClient(
                **settings.client_config(), client_id=client_id, bootstrap_timeout_ms=min(10_000, remaining_ms)
            )
        except KafkaError as exc:
            cause: Exception = exc
            if is_bootstrap_failure(exc):
                cause = diagnose(settings)
                if isinstance(cause, KafkaAuthFailed):
                    raise cause from exc
            if time.monotonic() > deadline:
                raise KafkaStalled(f"cannot use Kafka at {settings.bootstrap_servers}: {cause}") from exc
            time.sleep(0.5)


def wait_for_metadata(admin: KafkaAdminClient, topics: list[str], deadline: float) -> None:
    # create_topics returns once the controller accepted the request; leaders may be elected a
    # moment later. Producing before that fails the first sends, so wait until every partition has one.
    while True:
        try:
            described = admin.describe_topics(topics)
        except KafkaError as exc:
            described = [{"error": str(exc)}]
        ready = all(
            t.get("error_code") == 0 and t["partitions"] and all(p["leader_id"] >= 0 for p in t["partitions"])
            for t in described
        )
        if ready:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics {topics} have no leaders yet: {described}")
        time.sleep(0.2)
