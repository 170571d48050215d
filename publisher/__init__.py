"""Periodic, versioned publishes of embeddings to the key-value store."""
