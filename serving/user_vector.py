"""The user vector at request time: the dense user tower on the published ID row, last-N and profile.

The publisher stores, per user, the *effective* ID-embedding row (the online row the worker trained, or the
model's own row) and the last-N clicked items, under the model version named in the store's meta. The rest of
the user tower (profile feature tables, the last-N table, the MLP) is that model version's, frozen between
nightly runs (DESIGN.md "Updating the model"). So ``a = user_tower(profile, last-N, id_row)`` here is the
same vector the worker trains against, and fresh clicks move it twice: through the trained ID row and through
the last-N list.

A user the store holds no row for but the model knows (no click since the model's data cutoff) gets the model's
own ID row, which is what the publisher would publish for them. A user neither knows is a cold start, not an
error: the model's default ID row (row 0, learnt from the rows training masks to it) plus whatever the request
sent (recent items, profile fields).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from streaming.events import UserProfile
from trainer.artifact import ModelVersion

__all__ = ["is_known", "model_row", "user_vectors"]


def model_row(version: ModelVersion, user_id: str) -> np.ndarray:
    """The model's own ID row ``[id_dim]`` of ``user_id``; row 0, the default, for a user it does not know."""
    return version.model.user_tower.id_table.weight[version.encoder.user_vocab.index(user_id)].detach().numpy()


def is_known(version: ModelVersion, user_id: str) -> bool:
    """Whether the model has an ID row of its own for ``user_id``."""
    return user_id in version.encoder.user_vocab


@torch.no_grad()
def user_vectors(
    version: ModelVersion,
    user_ids: Sequence[str],
    id_rows: Sequence[np.ndarray | None],
    histories: Sequence[Sequence[str]],
    profiles: Sequence[UserProfile | None],
) -> np.ndarray:
    """Unit user vectors ``[B, dim]``.

    ``id_rows[b]``: the published ID row ``[id_dim]``, or None for the model's own row of the user (row 0 when it
    does not know the user; also used when a row's size does not fit the model, which a consistent snapshot never
    produces); ``histories[b]``: clicked item ids,
    oldest first (the last N are used; ids the model does not know map to its unknown row); ``profiles[b]``:
    the profile, or None for default features.
    """
    model = version.model
    id_dim = model.user_tower.id_table.embedding_dim
    rows = np.stack(
        [
            r if r is not None and r.shape == (id_dim,) else model_row(version, u)
            for u, r in zip(user_ids, id_rows, strict=True)
        ]
    ).astype(np.float32)
    by_user = {u: p for u, p in zip(user_ids, profiles, strict=True) if p is not None}
    batch = version.encoder.encode_users(list(user_ids), by_user, [list(h) for h in histories])
    return model.user_tower(batch, id_rows=torch.from_numpy(rows)).numpy()  # [B, dim]
