"""Callbacks every fit gets from the ``lightning`` CLI."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import Callback


class RNGState(Callback):
    """Saves the global RNG states (torch, numpy, Python) in every checkpoint and restores them on resume.

    Lightning restores weights, optimizer and loop counters but not the random generators, so a resumed fit
    would shuffle and augment its next epochs differently from an uninterrupted one.  With this callback a
    fit that is killed and resumed from ``last.ckpt`` ends with the same weights (single process; under DDP
    each rank's sampler is already seeded by epoch, while augmentation draws follow rank 0's saved state).
    """

    def state_dict(self) -> dict[str, Any]:
        states = _collect_rng_states(include_cuda=False)
        # numpy arrays would make the checkpoint unloadable with torch.load(weights_only=True): use a tensor.
        name, keys, pos, has_gauss, gauss = states["numpy"]
        states["numpy"] = (
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        )
        return states

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        name, keys, pos, has_gauss, gauss = state["numpy"]
        state["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
        _set_rng_states(state)
