"""The type aliases jaxprune's modules share (one definition each)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any  # a JAX pytree: nested dicts, lists, tuples, dataclasses, Equinox modules
Shape = tuple[int, ...]
ApplyFn = Callable[[PyTree, Any], jax.Array]  # (params, batch) -> outputs, e.g. logits
LossFn = Callable[..., Any]  # (params, batch[, rng=]) -> loss, or (loss, aux)
