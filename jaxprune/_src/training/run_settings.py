"""What a run was started with, by value: the fingerprint a resume must match.

A checkpoint records the settings of its run; a resume compares them with the
settings it is called with and refuses a difference (`check_fingerprint`), so a
run never continues under other settings without a word. Settings are recorded
*by value* (`describe`): a target by every field (a score's seed, a
distribution's `fixed` paths), an array by shape, dtype and digest, a function by
its code and the values it closes over, never by `str()` or identity.

The training transformations (`pruned`, `gradually_pruned`,
`drop_and_grow`, `straight_through`) say what they hold when their `init` runs inside
`recording()` (`note_settings`); a driver reads those notes whatever wraps the
transformation (`optax.chain`, `MultiSteps`, `inject_hyperparams`). A schedule is
recorded by what it gives at every count where masks are recomputed
(`schedule_values`). The wrapped optimizer's own hyperparameters (learning rate,
weight decay) stay the user's: only the layout of its state is recorded.

Examples:
  >>> import jaxprune
  >>> from jaxprune._src.training.run_settings import describe
  >>> describe(jaxprune.scores.random_score(0)) == describe(jaxprune.scores.random_score(0))
  True
  >>> describe(jaxprune.scores.random_score(0)) == describe(jaxprune.scores.random_score(1))
  False
  >>> erk = jaxprune.distributions.erk()
  >>> describe(jaxprune.Prune(0.5, distribution=erk))["distribution"]["power"]
  1.0
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import json
import math
import numbers
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src.training.integrity import checksums
from jaxprune._src.tree.leaf_selection import leaf_paths
from jaxprune._src.types import PyTree

# 2: masks stored inside the optimizer state (their one home), not beside it.
# 3: masks packed along each leaf's last axis (`packed_masks`), as `pruned` holds them.
# 4: every array checksummed and the meta digested (`integrity`); settings by value.
FORMAT = 5

# Settings a resume can never change: the restored arrays would not fit.
LAYOUT_KEYS = ("format", "params_layout", "num_leaves", "optimizer_state")


def _name(kind: type) -> str:
  return f"{kind.__module__}.{kind.__qualname__}"


def _digest(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:16]


def _describe_array(x: Any) -> Any:
  if isinstance(x, jax.core.Tracer):
    return f"traced {x.dtype}{list(x.shape)}"
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if np.shape(x) == ():
    return describe(np.asarray(x).item())
  if isinstance(x, np.ndarray) or x.is_fully_addressable:
    x = np.ascontiguousarray(np.asarray(x))
    return {"array": f"{x.dtype}{list(x.shape)}", "digest": _digest(x.tobytes())}
  # A global array of several processes: checksummed on the devices, never gathered.
  return {"array": f"{x.dtype}{list(x.shape)}", "checksum": checksums(x).sums[0]}


def _describe_code(code: types.CodeType) -> str:
  parts = [code.co_code, repr(code.co_names).encode()]
  parts += [_describe_code(c).encode() if isinstance(c, types.CodeType) else repr(c).encode()
            for c in code.co_consts]
  return _digest(b"\0".join(parts))


def _describe_function(fn: Any, depth: int) -> dict:
  if isinstance(fn, functools.partial):
    return {"partial": describe(fn.func, depth), "args": describe(fn.args, depth),
            "keywords": describe(fn.keywords, depth)}
  if isinstance(fn, types.MethodType):
    return {"method": describe(fn.__func__, depth), "of": describe(fn.__self__, depth)}
  described = {"function": f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"}
  code = getattr(fn, "__code__", None)
  if code is not None:
    cells = [c.cell_contents for c in (fn.__closure__ or ()) if _filled(c)]
    described.update(code=_describe_code(code), closure=describe(cells, depth),
                     defaults=describe(fn.__defaults__, depth),
                     kwdefaults=describe(fn.__kwdefaults__, depth))
  return described


def _filled(cell: Any) -> bool:
  try:
    cell.cell_contents  # noqa: B018 (an empty cell raises)
  except ValueError:
    return False
  return True


def describe(value: Any, _depth: int = 0) -> Any:
  """`value` as plain JSON, by value: equal settings give equal descriptions.

  Numbers (Python, NumPy, 0-d arrays alike: `np.float32(0.5)` is `0.5`), strings,
  lists and mappings as themselves; dataclasses and named tuples as their type and
  fields; arrays as dtype, shape and a digest of their bytes (a PRNG key by its
  data); functions as their name, a digest of their code and the values they close
  over; any other object as its type and attributes.
  """
  depth = _depth + 1
  if depth > 16:
    return "..."  # a cycle (a function closing over itself) or a very deep tree
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    f = float(value)
    return f if math.isfinite(f) else repr(f)
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return _describe_array(value)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    fields = {f.name: describe(getattr(value, f.name), depth) for f in dataclasses.fields(value)}
    return {"type": _name(type(value)), **fields}
  if isinstance(value, tuple) and hasattr(value, "_fields"):
    return {"type": _name(type(value)), **describe(value._asdict(), depth)}
  if isinstance(value, (list, tuple)):
    return [describe(v, depth) for v in value]
  if isinstance(value, Mapping):
    return {str(k): describe(value[k], depth) for k in sorted(value, key=str)}
  if isinstance(value, type):
    return {"class": _name(value)}
  if callable(value) and (hasattr(value, "__code__") or isinstance(
      value, (functools.partial, types.MethodType, types.BuiltinFunctionType))):
    return _describe_function(value, depth)
  attributes = getattr(value, "__dict__", None)
  return {"type": _name(type(value)),
          **({} if attributes is None else {"attributes": describe(attributes, depth)})}


# ----------------------------------------------------------------------------- notes


_NOTES: contextvars.ContextVar[list[dict] | None] = contextvars.ContextVar(
    "jaxprune_settings_notes", default=None)


def note_settings(transform: str, **settings: Any) -> None:
  """Called by a training transformation's `init`: what it holds (schedule,
  `update_every`, scope), for a driver listening through `recording()`."""
  notes = _NOTES.get()
  if notes is not None:
    notes.append({"transform": transform, **settings})


@contextlib.contextmanager
def recording() -> Iterator[list[dict]]:
  """The settings noted by every `init` run inside the block, in order."""
  notes: list[dict] = []
  token = _NOTES.set(notes)
  try:
    yield notes
  finally:
    _NOTES.reset(token)


def schedule_values(schedule: Callable[[jax.Array], Any], update_every: int,
                    updates: int) -> Any:
  """What `schedule` gives at every count where masks are recomputed (0, K, 2K,
  ... below `updates`; at most 4,096 of them, evenly spaced), described by value."""
  counts = np.arange(0, max(int(updates), 1), update_every)
  if len(counts) > 4096:
    counts = np.unique(np.linspace(0, len(counts) - 1, 4096).astype(np.int64)) * update_every
  try:
    values = jax.vmap(schedule)(jnp.asarray(counts, jnp.int32))
  except Exception:  # a schedule vmap cannot batch (a Python float out): one count at a time
    values = [schedule(jnp.int32(c)) for c in counts[:: max(1, len(counts) // 256)]]
  return describe(values)


def describe_notes(notes: list[dict], updates: int) -> list[Any]:
  """`notes` by value, each schedule by `schedule_values` over `updates` updates."""
  described = []
  for note in notes:
    note = dict(note)
    if callable(note.get("schedule")) and note.get("update_every"):
      note["schedule"] = schedule_values(note["schedule"], note["update_every"], updates)
    described.append(describe(note))
  return described


# ----------------------------------------------------------------------------- fingerprints


def describe_state(opt_state: PyTree) -> str:
  """A short name of an optimizer state's layout: the node types in order
  (`PrunedState/ScaleByAdamState/...`) and a digest of every leaf's path, shape and
  dtype, the held masks left out (their layout follows the params', and the
  settings name a change of selection). Two optimizers agree iff their states
  would restore into each other."""
  kinds: list[str] = []

  def visit(node: Any) -> None:
    if isinstance(node, (dict, list, tuple)) and type(node) in (dict, list, tuple):
      children = node.values() if isinstance(node, dict) else node
    elif jax.tree_util.treedef_is_leaf(jax.tree.structure(node)):
      return
    else:
      name = type(node).__name__
      if not kinds or kinds[-1] != name:
        kinds.append(name)
      children = jax.tree.leaves(node, is_leaf=lambda y: y is not node)
    for child in children:
      visit(child)

  visit(opt_state)
  layout = [f"{p}:{np.shape(x)}:{getattr(x, 'dtype', type(x).__name__)}"
            for p, x in zip(leaf_paths(opt_state), jax.tree.leaves(opt_state))
            if "packed_masks" not in p.split("/")]
  digest = _digest("\n".join(layout).encode())[:12]
  return f"{'/'.join(kinds) or 'no state'} ({len(layout)} arrays, layout {digest})"


def fingerprint(params: PyTree, **settings: Any) -> dict[str, Any]:
  """JSON description of a run that a checkpoint must match to be resumed: the
  format, the params' layout (paths, shapes, dtypes) and `settings` by value."""
  layout = [f"{p}:{tuple(x.shape)}:{x.dtype}"
            for p, x in zip(leaf_paths(params), jax.tree.leaves(params))]
  return {"format": FORMAT, "params_layout": _digest("\n".join(layout).encode()),
          "num_leaves": len(layout), **json.loads(json.dumps(describe(settings)))}


def changed_settings(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
  """The keys on which two fingerprints differ, by name."""
  keys = [k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k)]
  # The optimizer state follows from the params and settings: named last.
  return sorted(keys, key=lambda k: (k == "optimizer_state", k))


def _shown(settings: dict[str, Any], key: str, limit: int = 300) -> str:
  if key not in settings:  # e.g. a checkpoint written by a hand-written loop
    return "not recorded"
  text = json.dumps(settings[key], sort_keys=True)
  return text if len(text) <= limit else text[:limit] + "..."


def check_fingerprint(saved: dict[str, Any], expected: dict[str, Any], where: str, *,
                      allow_changes: bool = False) -> list[str]:
  """The settings that changed (allowed ones, with `allow_changes`); a ValueError
  naming the first that may not change and its two values."""
  changed = changed_settings(saved, expected)
  refused = [k for k in changed if k in LAYOUT_KEYS or not allow_changes]
  if refused:
    key = refused[0]
    what = "the optimizer state" if key == "optimizer_state" else key
    hint = ("the arrays would not restore into this run" if key in LAYOUT_KEYS else
            "pass resume='with_changes' to continue it under the new settings")
    raise ValueError(
        f"{where} was written by another configuration: {what} is {_shown(saved, key)} "
        f"there and {_shown(expected, key)} now. Resume with the same settings (and "
        f"optimizer), use another checkpoint directory, or {hint} (nothing was overwritten)."
    )
  return changed
