"""What a nightly run carries to the next besides the weights: the optimizer's moments and the logQ estimate.

DESIGN.md "Updating the model": the full update starts from yesterday's parameters. Adam's moments are part of
that state, and the frequency estimate of Yi et al. (2019) follows the stream: restarted every night, it is wrong
for the first batches. :class:`TrainingState` captures both from a finished run and restores them into the next
run's optimizer and estimator, fitting embedding tables that grew in between; :mod:`trainer.artifact` stores it
in a version as ``optimizer.pt`` and ``frequency.npz``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from trainer.frequency import FrequencyEstimator

__all__ = ["TrainingState"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingState:
    """The optimizer and logQ state a version carries for the next night's warm start (both optional).

    ``optimizer``: ``{parameter name: {key: tensor}}`` as the optimizer keeps it per parameter (Adam: ``step``
    ``[]``, ``exp_avg`` and ``exp_avg_sq`` shaped like the parameter), ``optimizer_kind`` its class name.
    Keyed by name, not by position in ``param_groups``: a model whose parameters are built in another order
    gets each moment back on the parameter it belongs to, or not at all. ``frequency``:
    :meth:`FrequencyEstimator.state_dict`.
    """

    optimizer_kind: str | None = None
    optimizer: Mapping[str, Mapping[str, Tensor]] | None = None
    frequency: Mapping[str, np.ndarray] | None = None

    @classmethod
    def capture(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        estimator: FrequencyEstimator | None = None,
    ) -> TrainingState:
        """Copy the state of ``optimizer`` (over ``model``'s parameters) and ``estimator``, either may be None."""
        named = None
        if optimizer is not None:
            named = {}
            for name, param in model.named_parameters():
                if param in optimizer.state:  # a defaultdict: indexing would insert an empty entry
                    named[name] = {
                        key: value.detach().cpu().clone()
                        for key, value in optimizer.state[param].items()
                        if isinstance(value, Tensor)
                    }
        return cls(
            type(optimizer).__name__ if optimizer is not None else None,
            named,
            estimator.state_dict() if estimator is not None else None,
        )

    def take_rows(self, rows: Mapping[str, np.ndarray]) -> TrainingState:
        """The state with the rows of the named tables gathered as :meth:`TwoTowerModel.take_id_rows` gathers
        the tables themselves: ``rows[parameter name]`` is the old row of each new one. An old row the saved
        state does not reach (an id added since it was saved) gets zero moments, as a grown row does; scalars
        (Adam's step) stay as they are. The frequency state is keyed by id strings and needs no gathering."""
        if self.optimizer is None:
            return self
        taken: dict[str, dict[str, Tensor]] = {}
        for name, state in self.optimizer.items():
            index = rows.get(name)
            if index is None:
                taken[name] = dict(state)
                continue
            index = torch.as_tensor(np.asarray(index, dtype=np.int64))
            out = {}
            for key, value in state.items():
                if value.ndim == 0:
                    out[key] = value
                    continue
                reach = int(index.max()) + 1 if len(index) else 0
                if value.shape[0] < reach:
                    value = torch.cat([value, value.new_zeros((reach - value.shape[0], *value.shape[1:]))])
                out[key] = value[index].clone()
            taken[name] = out
        return TrainingState(self.optimizer_kind, taken, self.frequency)

    def restore_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
        """Put the saved state on ``optimizer``'s parameters of ``model``, by name; returns the names restored.

        Embedding tables may have grown since (new ids appended, :meth:`TwoTowerModel.resize`): old rows keep
        their moments, new rows start at zero. Adam's step counter is per parameter, so a new row shares its
        table's step and gets no bias correction: its first updates are several times the learning rate
        (``(1 - beta1) / sqrt(1 - beta2)``, about 3, at the first), exactly as for an id that first shows up
        late within one epoch of dense Adam. Any other shape difference means the architecture changed: that parameter starts fresh,
        with a warning.
        """
        if self.optimizer is None:
            return []
        kind = type(optimizer).__name__
        if self.optimizer_kind != kind:
            logger.warning("optimizer state is for %s, the optimizer is %s: starting fresh", self.optimizer_kind, kind)
            return []
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = {name: p for name, p in model.named_parameters() if id(p) in owned}
        tables = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
        unknown = sorted(set(self.optimizer) - set(params))
        if unknown:
            logger.warning("optimizer state for %d parameters the model lacks is dropped: %s", len(unknown), unknown)
        restored = []
        for name, param in params.items():
            saved = self.optimizer.get(name)
            if saved is None:
                continue
            fitted = {key: _fit_rows(value, param, grow=name in tables) for key, value in saved.items()}
            bad = {key: tuple(saved[key].shape) for key, value in fitted.items() if value is None}
            if bad:
                logger.warning(
                    "optimizer state of %s has shapes %s, the parameter is %s: starting its state fresh",
                    name,
                    bad,
                    tuple(param.shape),
                )
                continue
            optimizer.state[param] = fitted
            restored.append(name)
        logger.info("optimizer state restored for %d of %d parameters", len(restored), len(params))
        return restored

    def restore_estimator(self, estimator: FrequencyEstimator) -> bool:
        """Load the saved frequency state into ``estimator``; False (with a warning) when none fits it."""
        if self.frequency is None:
            return False
        try:
            estimator.load_state_dict(dict(self.frequency))
        except (KeyError, ValueError) as exc:
            logger.warning("frequency state does not fit the estimator, starting it fresh: %s", exc)
            return False
        return True


def _fit_rows(saved: Tensor, param: Tensor, *, grow: bool) -> Tensor | None:
    """``saved`` as state for ``param``: scalars (Adam's step) as they are, tensors of the parameter's shape, or
    (``grow``: an embedding table) fewer rows padded with zero rows. None when it does not fit."""
    if saved.ndim == 0:
        return saved.clone()
    if saved.shape == param.shape:
        return saved.to(device=param.device, dtype=param.dtype, copy=True)
    if grow and saved.ndim == param.ndim and saved.shape[1:] == param.shape[1:] and saved.shape[0] < param.shape[0]:
        pad = param.new_zeros((param.shape[0] - saved.shape[0], *param.shape[1:]))
        return torch.cat([saved.to(device=param.device, dtype=param.dtype), pad])
    return None
