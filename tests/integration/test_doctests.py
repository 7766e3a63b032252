"""Every `>>>` example in jaxprune's docstrings runs as a doctest, in a temp dir.

The examples share a namespace of small concrete objects (`params`, `masks`, `loss_fn`,
...), built fresh for each module; each docstring gets its own copy of it.
"""

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune

# Every module, the private implementation's included (its docstrings are the API
# reference's text).
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(jaxprune.__path__, "jaxprune.") if not m.ispkg
)
OPTIONS = doctest.ELLIPSIS


def make_globs() -> dict:
  """The names the examples use, built fresh (a tiny 8 -> 8 -> 4 MLP and its data)."""
  k1, k2, kx, ky = jax.random.split(jax.random.key(0), 4)
  params = {
      "fc1": {"kernel": 0.5 * jax.random.normal(k1, (8, 8)), "bias": jnp.full(8, 0.1)},
      "fc2": {"kernel": 0.5 * jax.random.normal(k2, (8, 4))},
  }
  batch = {"x": jax.random.normal(kx, (16, 8)), "y": jax.random.randint(ky, (16,), 0, 4)}

  def loss_fn(params, batch):
    h = jax.nn.relu(batch["x"] @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    logits = h @ params["fc2"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  def batch_at_step(step):
    return batch

  where = jaxprune.select(params)
  masks = jaxprune.ranked_masks(params, 0.5, where)
  opt_state = jaxprune.pruned(optax.adam(1e-3), masks).init(params)
  return {
      "jax": jax,
      "jnp": jnp,
      "np": np,
      "optax": optax,
      "jaxprune": jaxprune,
      "params": params,
      "grads": jax.grad(loss_fn)(params, batch),
      "where": where,
      "masks": masks,
      "loss_fn": loss_fn,
      "batch": batch,
      "batch_at_step": batch_at_step,
      "eval_batches": [batch],
      "rng_data": jax.random.key_data(jax.random.key(0)),
      "opt_state": opt_state,
  }


def find(name: str, globs: dict) -> list[doctest.DocTest]:
  module = importlib.import_module(name)
  tests = doctest.DocTestFinder(exclude_empty=True).find(module, name, globs=globs)
  return [t for t in tests if t.examples]


def test_every_example_is_found():
  # A `>>>` the finder misses (a docstring it does not reach) would silently never run.
  total = 0
  for name in MODULES:
    source = Path(importlib.import_module(name).__file__).read_text()
    found = sum(len(t.examples) for t in find(name, {}))
    assert found == len(re.findall(r"^\s*>>>", source, flags=re.M)), name
    total += found
  assert total >= 30


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  runner = doctest.DocTestRunner(optionflags=OPTIONS)
  report = []
  for test in find(name, make_globs()):
    runner.run(test, out=report.append)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, "".join(report)
