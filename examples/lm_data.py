"""Byte-level text data for the LM examples: corpus loading, splitting and batching.

Tokens are UTF-8 bytes (vocab 256). Batches are int32 [B, context + 1]: the model reads
`batch[:, :-1]` and predicts `batch[:, 1:]`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_MAX_BYTES = 2_000_000


def default_corpus_text(max_bytes: int = DEFAULT_MAX_BYTES) -> str:
  """The built-in corpus, needing no download: Python standard library source.

  It is the top-level `*.py` files of the running interpreter's standard library (the
  directory holding `os.__file__`), sorted by file name, read as UTF-8 with
  `errors="replace"` and concatenated, stopping at `max_bytes` bytes of UTF-8. The text
  therefore depends on the Python version, but is fixed for a given interpreter.

  Returns:
    A string whose UTF-8 encoding is at most `max_bytes` bytes long.
  """
  stdlib = Path(os.__file__).parent
  files = sorted(stdlib.glob("*.py"), key=lambda p: p.name)
  if not files:
    raise FileNotFoundError(f"no *.py files in the standard library directory {stdlib}; "
                            "pass a text file instead")
  chunks, size = [], 0
  for path in files:
    data = path.read_text(encoding="utf-8", errors="replace").encode("utf-8")
    chunks.append(data[: max_bytes - size])
    size += len(chunks[-1])
    if size >= max_bytes:
      break
  # "ignore" drops a multi-byte character cut in half by the byte limit.
  return b"".join(chunks).decode("utf-8", errors="ignore")


def load_text(path: str | None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> str:
  """The text of file `path` (UTF-8, bad bytes replaced), or the default corpus if None.

  At most `max_bytes` bytes of UTF-8 are kept (`None`: the whole file; the default
  corpus then keeps its default size).

  Raises:
    FileNotFoundError / OSError: `path` cannot be read; the message names it.
    ValueError: the file is empty.
  """
  if path is None:
    return default_corpus_text(DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
  try:
    data = Path(path).read_bytes()
  except OSError as e:
    raise type(e)(f"cannot read text file {path!r}: {e.strerror or e}") from e
  if not data:
    raise ValueError(f"text file {path!r} is empty")
  return data[:max_bytes].decode("utf-8", errors="replace")


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes of `text` as a uint8 array [N]."""
  return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens: np.ndarray | jax.Array) -> str:
  """Byte tokens (any integer dtype, values 0..255) back to text; bad UTF-8 is replaced."""
  return np.asarray(tokens).astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def train_val_split(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
  """Contiguous split: the first (1 - val_fraction) of `tokens` trains, the rest validates."""
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  cut = round(len(tokens) * (1 - val_fraction))
  if cut == 0 or cut == len(tokens):
    raise ValueError(f"{len(tokens)} tokens are too few to split with "
                     f"val_fraction={val_fraction}")
  return tokens[:cut], tokens[cut:]


def _check_length(tokens: np.ndarray | jax.Array, context: int, what: str) -> None:
  if len(tokens) < context + 1:
    raise ValueError(f"{what} has {len(tokens)} tokens, fewer than context + 1 = "
                     f"{context + 1}; use more text or a shorter context")


def make_train_batches(
    tokens: np.ndarray | jax.Array, batch_size: int, context: int, seed: int
) -> Callable[[int | jax.Array], jax.Array]:
  """`batch_fn(step) -> int32 [batch_size, context + 1]` of random training windows.

  The batch is a pure function of `step` (window starts come from
  `fold_in(key(seed), step)`), so resuming at a step reproduces the same data. `step`
  may be a traced value inside `jit`. The tokens are moved to the device once.
  """
  _check_length(tokens, context, "training text")
  tokens = jnp.asarray(tokens)
  offsets = jnp.arange(context + 1)

  def batch_fn(step: int | jax.Array) -> jax.Array:
    key = jax.random.fold_in(jax.random.key(seed), step)
    starts = jax.random.randint(key, (batch_size, 1), 0, len(tokens) - context)
    return tokens[starts + offsets].astype(jnp.int32)

  return batch_fn


def make_eval_batches(
    tokens: np.ndarray | jax.Array, batch_size: int, context: int, num_batches: int
) -> list[jax.Array]:
  """`num_batches` fixed int32 [batch_size, context + 1] batches of validation windows.

  Window starts are evenly spaced over `tokens`; they do not overlap when the text is
  long enough (batch_size * num_batches * (context + 1) tokens), else they overlap.
  """
  _check_length(tokens, context, "validation text")
  count = batch_size * num_batches
  starts = np.linspace(0, len(tokens) - context - 1, count).astype(np.int64)
  windows = np.asarray(tokens)[starts[:, None] + np.arange(context + 1)].astype(np.int32)
  return [jnp.asarray(b) for b in windows.reshape(num_batches, batch_size, context + 1)]
