"""Data-parallel training of one epoch with ``torch.distributed`` (gloo, CPU): ``trainer full --nproc N``.

``N`` worker processes are spawned on 127.0.0.1 (a free port). Each starts from the same weights, trains
:func:`trainer.train.train_epoch` on its shard of the day's clicks, and averages gradients with the others
before every optimizer step, so every rank applies the same update and the replicas stay identical;
rank 0 hands the trained weights back to the caller, which writes the version.

Sharding is by user, not by click: each user's clicks go to one rank (like the Kafka partitions keyed by
``user_id``), so the last-N history of every example is the same as in a single process. Users are dealt
to ranks largest first onto the least loaded rank, which balances the number of clicks per rank.

Gradient averaging (:class:`GradientAverager`) wraps the optimizer that ``train_epoch`` calls: before each
step it all-reduces one flat buffer holding every parameter's gradient, a per-parameter "has a gradient"
flag and a count of ranks still training. Ranks whose shard ran out keep joining the collective with zero
gradients (:meth:`GradientAverager.finish`) and apply the same averaged steps until every rank is done, so
shards of unequal length neither deadlock nor let the replicas drift. The embedding tables are dense
``nn.Embedding`` weights, so their gradients are dense and all-reduced whole; at millions of ids one would
switch to sparse gradients and exchange only the touched rows (all-gather of indices and rows).

Each rank uses ``batch_size // N`` examples per step, so the global batch, the number of optimizer steps
per epoch and the learning-rate schedule match a single process; the in-batch negatives of the listwise
loss come from the rank's own (smaller) batch.

Warm state: the caller's optimizer state and frequency estimate (the nightly warm start) are copied to
every rank. The replicas apply the same averaged steps to the same starting moments, so every rank ends
with the same optimizer state; rank 0's is written back into the caller's optimizer. Each rank's frequency
estimator follows its own batches (that is what its in-batch logQ needs): rank 0's comes back. A rank's
batch is ``1 / N`` of the global batch, so its ``p_j`` is roughly ``N`` times smaller than one process's for
all but the hottest items. When ``N`` (or the batch size) changes between nights, the nightly job rescales
the carried estimate to the new per-process batch (:meth:`FrequencyEstimator.rescale_batch`,
:func:`trainer.full.batch_ratio`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.dataset import Dataset
from trainer.features import FeatureEncoder
from trainer.frequency import FrequencyEstimator
from trainer.model import ModelConfig, TwoTowerModel
from trainer.train import TrainConfig, TrainStats, make_estimator, make_optimizer, train_epoch
from trainer.warm_state import TrainingState

__all__ = ["GradientAverager", "shard_by_user", "train_distributed"]

logger = logging.getLogger(__name__)


def shard_by_user(dataset: Dataset, nproc: int) -> list[Dataset]:
    """``nproc`` datasets with disjoint users and balanced click counts; catalogue and profiles are shared."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    users, counts = np.unique(dataset.clicks.user, return_counts=True)
    # Largest first onto the least loaded rank (LPT scheduling); ties by user id for determinism.
    order = sorted(range(len(users)), key=lambda i: (-int(counts[i]), str(users[i])))
    load = [0] * nproc
    rank_of: dict[str, int] = {}
    for i in order:
        rank = min(range(nproc), key=lambda r: (load[r], r))
        rank_of[str(users[i])] = rank
        load[rank] += int(counts[i])
    ranks = np.fromiter((rank_of[u] for u in dataset.clicks.user.tolist()), dtype=np.int64, count=len(dataset.clicks))
    return [
        Dataset(dataset.items, dataset.users, dataset.clicks.select(ranks == r), dataset.exposures)
        for r in range(nproc)
    ]


class GradientAverager:
    """An optimizer wrapper that averages gradients over the ranks of the default process group.

    ``step()`` all-reduces ``[grads..., has_grad flags..., 1]`` in one buffer, sets each parameter's gradient
    to the mean over the ranks that produced one (None when no rank did, so Adam skips it as it would in one
    process), then steps the wrapped optimizer. ``finish()`` must be called by every rank after its last step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
        self.optimizer = optimizer
        self.params = params
        self.sizes = [p.numel() for p in params]
        self.steps = 0

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _exchange(self, active: bool) -> float:
        """All-reduce this rank's gradients; returns how many ranks were still training."""
        n = len(self.params)
        buffer = torch.zeros(sum(self.sizes) + n + 1)  # [total_params + n_params + 1]
        offset = 0
        for i, (p, size) in enumerate(zip(self.params, self.sizes, strict=True)):
            if active and p.grad is not None:
                buffer[offset : offset + size] = p.grad.reshape(-1)
                buffer[-n - 1 + i] = 1.0
            offset += size
        buffer[-1] = 1.0 if active else 0.0
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        n_active = float(buffer[-1])
        if n_active == 0:
            return 0.0
        offset = 0
        for i, (p, size) in enumerate(zip(self.params, self.sizes, strict=True)):
            if buffer[-n - 1 + i] > 0:
                p.grad = (buffer[offset : offset + size] / n_active).reshape(p.shape).clone()
            else:
                p.grad = None
            offset += size
        self.optimizer.step()
        self.steps += 1
        return n_active

    def step(self) -> None:
        self._exchange(active=True)

    def finish(self) -> None:
        """Join the remaining steps of slower ranks with zero gradients until every rank is done."""
        while True:
            self.optimizer.zero_grad(set_to_none=True)
            if self._exchange(active=False) == 0:
                return


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class _Job:
    encoder_json: str
    model_config: ModelConfig
    train_config: TrainConfig
    nproc: int
    port: int
    out_dir: str
    threads: int
    progress: bool
    timeout_s: float
    estimator: tuple[int, int, float, int, float]  # num_buckets, num_hashes, alpha, seed, min_probability


def _worker(rank: int, job: _Job, state: dict[str, torch.Tensor], shards: list[Dataset], warm: TrainingState) -> None:
    torch.set_num_threads(job.threads)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{job.port}",
        rank=rank,
        world_size=job.nproc,
        timeout=dt.timedelta(seconds=job.timeout_s),
    )
    try:
        encoder = FeatureEncoder.from_json(job.encoder_json)
        model = TwoTowerModel(encoder, job.model_config)
        model.load_state_dict(state)
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)  # identical replicas even if a rank's copy differed
        # Different seeds per rank: otherwise every rank would draw the same SSL items and negatives.
        config = dataclasses.replace(
            job.train_config,
            batch_size=max(2, job.train_config.batch_size // job.nproc),
            seed=job.train_config.seed * 1009 + rank,
        )
        params = list(model.parameters())
        adam = make_optimizer(model, config)
        warm.restore_optimizer(model, adam)
        # The caller's hash settings, not the rank's seed: the state then fits and goes back to the caller.
        buckets, hashes, alpha, seed, floor = job.estimator
        estimator = FrequencyEstimator(buckets, hashes, alpha, seed, min_probability=floor)
        warm.restore_estimator(estimator)
        optimizer = GradientAverager(adam, params)
        stats = train_epoch(
            model,
            encoder,
            shards[rank],
            config,
            progress=job.progress and rank == 0,
            optimizer=optimizer,  # type: ignore[arg-type]
            estimator=estimator,
        )
        optimizer.finish()
        out = Path(job.out_dir)
        (out / f"stats-{rank}.json").write_text(json.dumps(dataclasses.asdict(stats)))
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "state.pt")
            (out / "steps.json").write_text(json.dumps({"optimizer_steps": optimizer.steps}))
            trained = TrainingState.capture(model, adam, estimator)
            torch.save({"kind": trained.optimizer_kind, "params": trained.optimizer}, out / "optimizer.pt")
            np.savez(out / "frequency.npz", **trained.frequency)  # type: ignore[arg-type]
    finally:
        dist.destroy_process_group()


def train_distributed(
    model: TwoTowerModel,
    encoder: FeatureEncoder,
    dataset: Dataset,
    config: TrainConfig,
    *,
    nproc: int,
    progress: bool = True,
    timeout_s: float = 1800.0,
    optimizer: torch.optim.Optimizer | None = None,
    estimator: FrequencyEstimator | None = None,
) -> TrainStats:
    """One epoch over ``dataset`` on ``nproc`` CPU processes; ``model`` is updated in place with rank 0's weights.

    ``optimizer`` (over ``model``'s parameters, of the kind :func:`make_optimizer` builds) and ``estimator``,
    as in :func:`train_epoch`, carry state in and out: every rank starts from theirs, and they end holding
    rank 0's. Returns the epoch's statistics summed (steps, examples, skipped) or averaged (losses) over the
    ranks; ``steps`` counts the optimizer steps every replica applied.
    """
    if nproc < 2:
        raise ValueError(f"train_distributed needs nproc >= 2, got {nproc}; call train_epoch for one process")
    n_users = len(np.unique(dataset.clicks.user))
    if n_users < nproc:
        logger.warning("only %d users with clicks: training on %d processes instead of %d", n_users, n_users, nproc)
        nproc = n_users
        if nproc < 2:
            return train_epoch(
                model, encoder, dataset, config, progress=progress, optimizer=optimizer, estimator=estimator
            )
    shards = shard_by_user(dataset, nproc)
    logger.info("training on %d processes; clicks per rank %s", nproc, [len(s.clicks) for s in shards])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    warm = TrainingState.capture(model, optimizer, estimator)
    est = estimator if estimator is not None else make_estimator(config)
    est_args = (est.num_buckets, est.num_hashes, est.alpha, est.seed, est.min_probability)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    with tempfile.TemporaryDirectory(prefix="freshtower-ddp-") as out_dir:
        job = _Job(
            encoder.to_json(),
            model.config,
            config,
            nproc,
            _free_port(),
            out_dir,
            threads,
            progress,
            timeout_s,
            est_args,
        )
        try:
            mp.spawn(_worker, args=(job, state, shards, warm), nprocs=nproc, join=True)
        except mp.ProcessRaisedException as exc:
            # Keep the single-process contract: a NaN loss on any rank is a FloatingPointError here too.
            if "FloatingPointError" in str(exc):
                raise FloatingPointError(str(exc).strip().splitlines()[-1]) from None
            raise
        trained = torch.load(Path(out_dir) / "state.pt", map_location="cpu", weights_only=True)
        per_rank = [json.loads((Path(out_dir) / f"stats-{r}.json").read_text()) for r in range(nproc)]
        steps = json.loads((Path(out_dir) / "steps.json").read_text())["optimizer_steps"]
        raw = torch.load(Path(out_dir) / "optimizer.pt", map_location="cpu", weights_only=True)
        with np.load(Path(out_dir) / "frequency.npz", allow_pickle=False) as arrays:
            frequency = {name: arrays[name] for name in arrays.files}
    # In place: the parameters stay the same objects, so ``optimizer`` still holds them.
    model.load_state_dict(trained)
    model.eval()
    back = TrainingState(raw["kind"], raw["params"], frequency)
    if optimizer is not None:
        back.restore_optimizer(model, optimizer)
    if estimator is not None:
        back.restore_estimator(estimator)

    def mean(key: str) -> float:
        return float(np.mean([s[key] for s in per_rank]))

    return TrainStats(
        steps=int(steps),
        examples=sum(int(s["examples"]) for s in per_rank),
        mean_loss=mean("mean_loss"),
        first_loss=mean("first_loss"),
        last_loss=mean("last_loss"),
        main_loss=mean("main_loss"),
        ssl_loss=mean("ssl_loss"),
        skipped=sum(int(s["skipped"]) for s in per_rank),
        seconds=max(float(s["seconds"]) for s in per_rank),
    )
