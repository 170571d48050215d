"""Kafka in: event contracts, event sources, the consumer with its dead-letter topic, and the
incremental learner."""
