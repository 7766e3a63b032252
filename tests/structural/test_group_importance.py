"""Group importances against NumPy (issue 30): magnitude (L1/L2, sum/mean/max across
members), Taylor `Σ|w·g|`, Minitron's activation norms (the rows the down and
output projections read, the norms' outputs every projection reads), per layer in
a scanned stack; and `keep_top`'s policies: per-kind fractions, the same width in
every layer, one global ranking, GQA's two ways (query heads evenly within KV
groups, or whole KV groups), rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune.structural import (
    Group,
    Member,
    activation_importance,
    channel_groups,
    keep_top,
    magnitude_importance,
    taylor_importance,
)

D, F, T, LAYERS = 4, 6, 5, 3


def _unit_reference(leaf, member: Member, size: int) -> np.ndarray:
  """NumPy: each unit's entries of `member`, `(size, rest)`, written out by loops."""
  arr = np.moveaxis(np.asarray(leaf, np.float64), member.axis, 0)
  rows = []
  for u in range(size):
    index = [member.offset + o * size * member.block + u * member.block + j
             for o in range(member.outer) for j in range(member.block)]
    rows.append(arr[index].reshape(-1))
  return np.stack(rows)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(0, 3),
       st.sampled_from(["l1", "l2"]), st.sampled_from(["sum", "mean", "max"]))
def test_magnitude_importance_matches_numpy(size, block, outer, offset, norm, across):
  rng = np.random.default_rng(size * 100 + block * 10 + outer + offset)
  length = offset + outer * size * block + 2  # two trailing entries no unit covers
  members = (Member("a", 1, block, offset, outer), Member("b", 0))
  params = {"a": rng.normal(size=(3, length)), "b": rng.normal(size=(size, 2))}
  group = Group("mlp_hidden", size, members, True)
  got = magnitude_importance([group], params, norm=norm, across=across)[0]
  per_member = []
  for m, leaf in zip(members, (params["a"], params["b"])):
    rows = _unit_reference(leaf, m, size)
    per_member.append(np.abs(rows).sum(1) if norm == "l1" else np.sqrt((rows ** 2).sum(1)))
  expected = {"sum": np.sum, "mean": np.mean, "max": np.max}[across](per_member, axis=0)
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def _mlp(p, x):
  return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]


def _mlp_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"w1": jax.random.normal(k[0], (D, F)), "b1": jax.random.normal(k[1], (F,)),
          "w2": jax.random.normal(k[2], (F, D))}


def _batches():
  return [jax.random.normal(jax.random.key(10 + i), (T, D)) for i in range(2)]


def _hidden(groups) -> int:
  (index,) = [i for i, g in enumerate(groups) if g.kind == "mlp_hidden"]
  return index


def test_taylor_importance_is_the_sum_of_weight_times_gradient():
  params, batches = _mlp_params(), _batches()
  groups = channel_groups(_mlp, params, batches[0])
  loss = lambda p, x: jnp.mean(_mlp(p, x) ** 2)
  grads = jax.tree.map(lambda *g: sum(g) / len(g), *[jax.grad(loss)(params, x) for x in batches])
  got = taylor_importance(groups, params, grads)[_hidden(groups)]
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
  expected = [np.abs(w["w1"][:, u] * g["w1"][:, u]).sum() + abs(w["b1"][u] * g["b1"][u])
              + np.abs(w["w2"][u] * g["w2"][u]).sum() for u in range(F)]
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_activation_importance_reads_what_the_down_projection_reads():
  params, batches = _mlp_params(), _batches()
  groups = channel_groups(_mlp, params, batches[0])
  got = activation_importance(groups, _mlp, params, batches)
  hidden = [np.maximum(np.asarray(x) @ params["w1"] + params["b1"], 0) for x in batches]
  expected = np.sqrt(sum((h.astype(np.float64) ** 2).sum(0) for h in hidden))
  np.testing.assert_allclose(got[_hidden(groups)], expected, rtol=1e-5)


def _rms(x, scale):
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale


def _stack_layer(x, p):
  return x + jax.nn.relu(_rms(x, p["norm"]) @ p["w1"]) @ p["w2"], None


def _stack(params, tokens):
  x, _ = jax.lax.scan(_stack_layer, params["embed"][tokens], params["layers"])
  return x @ params["embed"].T


def test_activation_importance_per_layer_and_of_the_residual_stream():
  k = jax.random.split(jax.random.key(3), 4)
  params = {"embed": jax.random.normal(k[0], (7, D)),
            "layers": {"norm": 1 + 0.1 * jax.random.normal(k[1], (LAYERS, D)),
                       "w1": jax.random.normal(k[2], (LAYERS, D, F)),
                       "w2": jax.random.normal(k[3], (LAYERS, F, D))}}
  batches = [jnp.arange(T) % 7, (jnp.arange(T) * 3) % 7]
  groups = channel_groups(_stack, params, batches[0])
  got = activation_importance(groups, _stack, params, batches)
  kinds = {groups[i].kind: i for i in got}
  # NumPy: run the layers, keep what w1 and w2 read.
  normed, hidden = np.zeros((LAYERS, D)), np.zeros((LAYERS, F))
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  for tokens in batches:
    x = p["embed"][np.asarray(tokens)]
    for i in range(LAYERS):
      n = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * p["layers"]["norm"][i]
      h = np.maximum(n @ p["layers"]["w1"][i], 0)
      normed[i] += (n ** 2).sum(0)
      hidden[i] += (h ** 2).sum(0)
      x = x + h @ p["layers"]["w2"][i]
  assert groups[kinds["mlp_hidden"]].layers == LAYERS
  np.testing.assert_allclose(got[kinds["mlp_hidden"]], np.sqrt(hidden), rtol=1e-4)
  # The residual stream spans the embedding (not stacked): one row over the layers;
  # the unembedding (embed.T) reads the stream too, so it adds to the norms' outputs.
  assert got[kinds["residual"]].shape == (D,)
  assert np.all(got[kinds["residual"]] > np.sqrt(normed.sum(0)) - 1e-6)


def test_activation_importance_leaves_out_or_refuses_what_no_matmul_reads():
  params = _gqa_params()
  groups = channel_groups(_gqa, params, jax.ShapeDtypeStruct((T, D), jnp.float32))
  head_dims = [i for i, g in enumerate(groups) if g.kind == "head_dim"]
  measured = activation_importance(groups, _gqa, params, _batches())
  # The values' head_dim is what the output projection reads; the queries' and keys'
  # is read by the scores only: left out when every kind is asked for...
  assert sum(i in measured for i in head_dims) == 1
  with pytest.raises(ValueError, match=r"no importance for group \d+ \(head_dim"):
    keep_top(groups, measured, {"head_dim": 0.5})
  # ...and refused, naming it, when asked for by kind.
  with pytest.raises(ValueError, match=r"\(head_dim, size 3\) is read as an input by no matmul"):
    activation_importance(groups, _gqa, params, _batches(), kinds=("head_dim",))


def _groups_of(sizes: dict[str, list[int]], layers: int | None = None) -> list[Group]:
  return [Group(kind, n, (Member(f"{kind}{i}", 0),), True, layers=layers)
          for kind, ns in sizes.items() for i, n in enumerate(ns)]


def test_keep_top_per_kind_fractions_and_rounding():
  groups = _groups_of({"mlp_hidden": [16, 16], "heads": [4]})
  importance = {i: np.arange(g.size, dtype=float)[::-1] for i, g in enumerate(groups)}
  keep = keep_top(groups, importance, {"mlp_hidden": 0.5, "heads": 0.75})
  assert [len(keep[i]) for i in range(3)] == [8, 8, 3]
  assert keep[2].tolist() == [0, 1, 2]  # the largest importances
  rounded = keep_top(groups, importance, {"mlp_hidden": 0.3}, round_to=8)
  assert sorted(rounded) == [0, 1] and all(len(v) == 8 for v in rounded.values())
  with pytest.raises(ValueError, match="kept fraction of heads"):
    keep_top(groups, importance, {"heads": 0.0})
  with pytest.raises(ValueError, match="no importance for group 2"):
    keep_top(groups, {0: importance[0]}, {"heads": 0.5})
  with pytest.raises(ValueError, match=r"has shape \(3,\); it needs \(4,\)"):
    keep_top(groups, {**importance, 2: np.ones(3)}, {"heads": 0.5})


def test_keep_top_global_ranks_across_groups_and_layer_keeps_equal_widths():
  groups = _groups_of({"mlp_hidden": [8, 8]})
  importance = {0: np.array([9., 8, 7, 6, 5, 4, 3, 2]), 1: np.array([1., 1, 1, 1, 1, 1, 1, 30])}
  layer = keep_top(groups, importance, 0.5)
  assert [len(layer[0]), len(layer[1])] == [4, 4]
  # Over its group's mean, group 1's last unit (30 / 4.6) outranks everything in group
  # 0 (at most 9 / 5.5); the rest of group 1 (1 / 4.6) ranks below all of group 0.
  glob = keep_top(groups, importance, 0.5, scope="global")
  assert glob[1].tolist() == [7] and glob[0].tolist() == [0, 1, 2, 3, 4, 5, 6]
  stacked = _groups_of({"mlp_hidden": [8]}, layers=2)
  with pytest.raises(ValueError, match="scanned stack"):
    keep_top(stacked, {0: np.ones((2, 8))}, 0.5, scope="global")
  per_layer = keep_top(stacked, {0: np.stack([np.arange(8.), -np.arange(8.)])}, 0.25)[0]
  assert per_layer.tolist() == [[6, 7], [0, 1]]  # each layer its own, equal widths


HEADS_KV, HEADS_G, HD = 2, 2, 3


def _attention_out(p, x):
  q = (x @ p["wq"]).reshape(T, HEADS_KV, HEADS_G, HD)
  k, v = ((x @ p[n]).reshape(T, HEADS_KV, HD) for n in ("wk", "wv"))
  scores = jax.nn.softmax(jnp.einsum("tkgh,skh->kgts", q, k), -1)
  return jnp.einsum("kgts,skh->tkgh", scores, v)  # (T, KV, G, HD)


def _gqa(p, x):
  return _attention_out(p, x).reshape(T, HEADS_KV * HEADS_G * HD) @ p["wo"]


def _gqa_params():
  k = jax.random.split(jax.random.key(4), 4)
  width = HEADS_KV * HEADS_G * HD
  return {"wq": jax.random.normal(k[0], (D, width)),
          "wk": jax.random.normal(k[1], (D, HEADS_KV * HD)),
          "wv": jax.random.normal(k[2], (D, HEADS_KV * HD)),
          "wo": jax.random.normal(k[3], (width, D))}


def test_gqa_query_heads_evenly_or_whole_kv_groups():
  params = _gqa_params()
  groups = channel_groups(_gqa, params, jax.ShapeDtypeStruct((T, D), jnp.float32))
  importance = activation_importance(groups, _gqa, params, _batches(), kinds=("heads", "kv_heads"))
  by_kind = {groups[i].kind: i for i in importance}
  # What the output projection reads, per query head (summed over every KV group:
  # Minitron ranks heads within the query groups) and per KV group.
  squares = sum(np.asarray(_attention_out(params, x), np.float64) ** 2 for x in _batches())
  np.testing.assert_allclose(importance[by_kind["heads"]],
                             np.sqrt(squares.sum((0, 1, 3))), rtol=1e-5)
  np.testing.assert_allclose(importance[by_kind["kv_heads"]],
                             np.sqrt(squares.sum((0, 2, 3))), rtol=1e-5)
  one = keep_top(groups, importance, {"heads": 0.5})
  (query_heads,) = one.values()
  assert len(query_heads) == 1 and groups[by_kind["heads"]].members[0].outer == HEADS_KV
  whole = keep_top(groups, importance, {"kv_heads": 0.5})
  assert len(whole[by_kind["kv_heads"]]) == 1
