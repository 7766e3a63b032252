"""`nnx_module` / `equinox_module`: a shrunk model put back into its framework.

For each model: `channel_groups`, `keep_top(0.5)`, `shrink`, write back; then (a)
the layers' size attributes are their new array shapes, (b) the module equals
`apply_fn` on the shrunk params, (c) both equal the dense model with the removed
units zeroed (for groups where removal is zeroing: no norm over them), and (d)
params of the wrong structure are refused naming a path.

The models are built abstractly and filled with NumPy arrays, and every forward
pass is one jitted call: eager ops would compile one XLA program per op and shape.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import numpy as np
import pytest
from flax import nnx

from jaxprune.structural import (
    WIDTH_KINDS,
    channel_groups,
    equinox_module,
    keep_top,
    magnitude_importance,
    nnx_module,
    shrink,
    shrunk_program,
)
from jaxprune.tree import path_string

B = 3

# The layers here are whatever the test builds: an axis no rule names (`other`) is
# shrunk too.
ANY = (*WIDTH_KINDS, "other")


def _zeroed(params, groups, keep):
  """`params` with the units of each kept group not kept zeroed (same shapes)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)
  at = {path_string(p): i for i, (p, _) in enumerate(flat)}
  leaves = [leaf for _, leaf in flat]
  for index, kept in keep.items():
    group = groups[index]
    alive = np.isin(np.arange(group.size), kept)
    for m in group.members:
      leaf = leaves[at[m.path]]
      mask = np.ones(leaf.shape[m.axis], leaf.dtype)
      mask[m.indices(group.size)[~alive].ravel()] = 0  # blocks, offsets, every outer copy
      shape = [1] * leaf.ndim
      shape[m.axis] = -1
      leaves[at[m.path]] = leaf * mask.reshape(shape)
  return jax.tree.unflatten(treedef, leaves)


def _shrunk(apply_fn, params, x, exact_only=False):
  """groups, keep (half of every prunable group; only those without a reduction
  over them when `exact_only`) and the shrunk params."""
  groups = channel_groups(apply_fn, params, x)
  keep = keep_top(groups, magnitude_importance(groups, params, kinds=ANY), 0.5, kinds=ANY)
  if exact_only:
    keep = {i: k for i, k in keep.items() if not groups[i].notes}
  assert keep, str(groups)
  return groups, keep, shrink(params, groups, keep)


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def _filled(abstract, seed=0):
  """`abstract` (a tree with `jax.ShapeDtypeStruct` leaves) filled with NumPy
  values: normal, but positive for a BatchNorm's variances."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if not isinstance(s, jax.ShapeDtypeStruct):
      return s
    name = jax.tree_util.keystr(path)
    values = (rng.uniform(0.5, 2.0, s.shape) if "var" in name else 0.5 * rng.normal(size=s.shape))
    return values.astype(s.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@functools.partial(jax.jit, static_argnums=0)
def _nnx_apply(graphdef, state, x):
  return nnx.merge(graphdef, state)(x)


def _nnx_run(module, x):
  """`module(x)`, jitted: the module's graphdef carries its size attributes."""
  return _nnx_apply(*nnx.split(module), x)


_eqx_run = eqx.filter_jit(lambda module, x: jax.vmap(module)(x))
_eqx_run_batch = eqx.filter_jit(lambda module, x: module(x))


# ----------------------------------------------------------------------------- NNX


class NnxMlp(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(4, 8, rngs=rngs)
    self.fc2 = nnx.Linear(8, 6, rngs=rngs)
    self.fc3 = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc3(jax.nn.relu(self.fc2(jax.nn.gelu(self.fc1(x)))))


class NnxConvNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
    self.conv2 = nnx.Conv(8, 6, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(6, use_running_average=True, rngs=rngs)
    self.head = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.bn1(self.conv1(x)))
    h = jax.nn.relu(self.bn2(self.conv2(h)))
    return self.head(h.mean(axis=(1, 2)))


class NnxNormed(nnx.Module):
  """A norm over the second hidden layer: shrinking it normalizes over the kept
  units, which is not zeroing; the first hidden layer is."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(4, 8, rngs=rngs)
    self.fc2 = nnx.Linear(8, 6, rngs=rngs)
    self.norm = nnx.LayerNorm(6, rngs=rngs)
    self.fc3 = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc3(jax.nn.relu(self.norm(self.fc2(jax.nn.relu(self.fc1(x))))))


class NnxTable(nnx.Module):
  """Embed -> LinearGeneral (to (2, 3)) -> Einsum: sizes held as tuples."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(10, 8, rngs=rngs)
    self.proj = nnx.LinearGeneral(8, (2, 3), rngs=rngs)
    self.mix = nnx.Einsum("bhd,hdo->bo", (2, 3, 4), (4,), rngs=rngs)

  def __call__(self, tokens):
    return self.mix(jax.nn.relu(self.proj(self.embed(tokens))))


class NnxMore(nnx.Module):
  """Conv -> ConvTranspose -> LoRALinear (its LoRA rank is a group of its own)."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.up = nnx.ConvTranspose(6, 4, (3, 3), rngs=rngs)
    self.head = nnx.LoRALinear(4, 2, lora_rank=2, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.relu(self.up(jax.nn.relu(self.conv(x))))
    return self.head(h.mean(axis=(1, 2)))


def _nnx_filled(build):
  """The NNX module `build()` makes, with `_filled` values (BatchNorm statistics
  that are not the identity)."""
  graphdef, state = nnx.split(nnx.eval_shape(build))
  return nnx.merge(graphdef, _filled(state))


def _nnx_case(name):
  cls = {"mlp": NnxMlp, "conv": NnxConvNet, "norm": NnxNormed, "table": NnxTable,
         "more": NnxMore}[name]
  model = _nnx_filled(lambda: cls(nnx.Rngs(0)))
  rng = np.random.default_rng(1)
  x = {"conv": rng.normal(size=(B, 5, 5, 3)), "more": rng.normal(size=(B, 5, 5, 3)),
       "table": np.array([1, 4, 7])}.get(
      name, rng.normal(size=(B, 4)))
  return model, x.astype(np.int32 if name == "table" else np.float32)


def _nnx_sizes(model) -> dict:
  """(layer path, attribute) -> value, for the attributes `nnx_module` rewrites."""
  names = ("in_features", "out_features", "num_features", "features", "num_embeddings",
           "kernel_shape", "bias_shape", "batch_axis")
  return {(path, n): getattr(m, n) for path, m in nnx.iter_modules(model) for n in names
          if hasattr(m, n)}


def _check_nnx_sizes(model):
  """(a): every rewritten attribute is read off the layer's arrays."""
  for _, m in nnx.iter_modules(model):
    if isinstance(m, (nnx.Linear, nnx.Conv, nnx.ConvTranspose)):
      assert (m.in_features, m.out_features) == m.kernel.shape[-2:]
      assert m.bias.shape == (m.out_features,)
    if isinstance(m, (nnx.Conv, nnx.ConvTranspose)):
      assert m.kernel_shape == m.kernel.shape
    if isinstance(m, nnx.LoRA):
      assert (m.in_features, m.out_features) == (m.lora_a.shape[0], m.lora_b.shape[1])
    if isinstance(m, (nnx.BatchNorm, nnx.LayerNorm)):
      assert (m.num_features,) == m.scale.shape == m.bias.shape
    if isinstance(m, nnx.BatchNorm):
      assert (m.num_features,) == m.mean.shape == m.var.shape
    if isinstance(m, nnx.Embed):
      assert (m.num_embeddings, m.features) == m.embedding.shape
    if isinstance(m, nnx.LinearGeneral):
      assert (*m.in_features, *m.out_features) == m.kernel.shape
    if isinstance(m, nnx.Einsum):
      assert (m.kernel_shape, m.bias_shape) == (m.kernel.shape, m.bias.shape)


@pytest.mark.parametrize("name", ["mlp", "conv", "norm", "table", "more"])
def test_nnx_module(name):
  model, x = _nnx_case(name)
  graphdef, state = nnx.split(model)
  apply_fn = functools.partial(_nnx_apply, graphdef)
  groups, keep, small = _shrunk(apply_fn, state, x)
  before = _nnx_sizes(model)
  smaller = nnx_module(graphdef, small)
  _check_nnx_sizes(smaller)  # (a)
  assert _nnx_sizes(smaller) != before and _nnx_sizes(model) == before  # model untouched
  out = _nnx_run(smaller, x)
  if name == "table":  # the dense graphdef's LinearGeneral reshapes its bias to (2, 3)
    with pytest.raises(TypeError, match="reshape"):
      apply_fn(small, x)
    _close(out, jax.jit(shrunk_program(groups, keep))(small, x))  # (b), the program
  else:
    _close(out, apply_fn(small, x))  # (b)
  _close(_nnx_run(nnx_module(model, small), x), out)  # the model form
  if name == "norm":  # (c) only where removal is zeroing: the unnormed hidden layer
    groups, keep, small = _shrunk(apply_fn, state, x, exact_only=True)
    assert len(keep) == 1
    out = _nnx_run(nnx_module(graphdef, small), x)
  _close(out, apply_fn(_zeroed(state, groups, keep), x))  # (c)


def test_group_norm_refused():
  """A GroupNorm's arrays do not say whether groups or channels in groups went."""
  norm = _nnx_filled(lambda: nnx.GroupNorm(8, num_groups=2, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(norm)
  half = jax.tree.map(lambda v: v[:4], state)
  with pytest.raises(ValueError, match="the root module \\(GroupNorm\\) went from 8 to 4"):
    nnx_module(graphdef, half)
  assert nnx_module(graphdef, state).num_groups == 2  # unchanged: accepted
  norm = _eqx_filled(lambda key: eqx.nn.GroupNorm(2, 8))
  half = eqx.tree_at(lambda m: (m.weight, m.bias), norm, (norm.weight[:4], norm.bias[:4]))
  with pytest.raises(ValueError, match="GroupNorm\\) went from 8 to 4"):
    equinox_module(norm, half)


def test_nnx_module_sizes_by_value():
  model, x = _nnx_case("table")
  graphdef, state = nnx.split(model)
  apply_fn = functools.partial(_nnx_apply, graphdef)
  groups = channel_groups(apply_fn, state, x)
  kinds = {tuple((m.path, m.axis) for m in g.members): g.prunable for g in groups}
  assert not kinds[(("embed/embedding/value", 0),)]  # the vocabulary is looked up
  keep = keep_top(groups, magnitude_importance(groups, state, kinds=ANY), 0.5, kinds=ANY)
  smaller = nnx_module(graphdef, shrink(state, groups, keep))
  assert (smaller.embed.num_embeddings, smaller.embed.features) == (10, 4)
  assert (smaller.proj.in_features, smaller.proj.out_features) == ((4,), (1, 2))
  assert smaller.mix.kernel_shape == (1, 2, 4) and smaller.mix.bias_shape == (4,)


def test_nnx_attention():
  model = _nnx_filled(lambda: nnx.MultiHeadAttention(
      num_heads=4, in_features=8, qkv_features=8, decode=False, rngs=nnx.Rngs(0)))
  x = np.random.default_rng(1).normal(size=(B, 5, 8)).astype(np.float32)
  graphdef, state = nnx.split(model)
  apply_fn = functools.partial(_nnx_apply, graphdef)
  groups, keep, small = _shrunk(apply_fn, state, x)
  smaller = nnx_module(graphdef, small)
  assert (smaller.num_heads, smaller.num_kv_heads, smaller.head_dim) == (2, 2, 1)
  assert smaller.qkv_features == 2 and smaller.out.in_features == (2, 1)
  with pytest.raises(TypeError, match="reshape"):  # the dense LinearGenerals' biases
    apply_fn(small, x)
  # (a, b) against the module built at the new sizes and given the shrunk state: a
  # narrower head scales the scores by 1/sqrt(1), as a model built that size does.
  fresh = nnx.eval_shape(lambda: nnx.MultiHeadAttention(
      num_heads=2, in_features=8, qkv_features=2, out_features=8, decode=False,
      rngs=nnx.Rngs(0)))
  nnx.update(fresh, small)
  assert _nnx_sizes(smaller) == _nnx_sizes(fresh)
  _close(_nnx_run(smaller, x), _nnx_run(fresh, x))
  # (c) for the heads alone (the scale is kept): removal is zeroing.
  heads = next(i for i, g in enumerate(groups) if ("query/kernel/value", 1, 1) in
               {tuple(m[:3]) for m in g.members})
  keep = {heads: keep[heads]}
  small = shrink(state, groups, keep)
  smaller = nnx_module(graphdef, small)
  assert (smaller.num_heads, smaller.head_dim) == (2, 2)
  out = _nnx_run(smaller, x)
  _close(out, apply_fn(_zeroed(state, groups, keep), x))
  _close(out, jax.jit(shrunk_program(groups, keep))(small, x))


def test_nnx_module_refuses_wrong_state():
  model, x = _nnx_case("conv")
  graphdef, state = nnx.split(model)
  apply_fn = functools.partial(_nnx_apply, graphdef)
  _, _, small = _shrunk(apply_fn, state, x)
  pure = nnx.to_pure_dict(small)
  del pure["head"]
  with pytest.raises(ValueError, match="no leaf at head/bias"):
    nnx_module(graphdef, pure)
  pure = nnx.to_pure_dict(small) | {"extra": {"kernel": np.ones(2)}}
  with pytest.raises(ValueError, match="extra/kernel"):
    nnx_module(model, pure)
  # Only the Params shrunk: the BatchNorm statistics keep 8 channels.
  _, params, _ = nnx.split(model, nnx.Param, ...)
  stats = nnx.state(model, nnx.BatchStat)
  groups = channel_groups(lambda p, x: nnx.merge(graphdef, p, stats)(x), params, x)
  small_params = shrink(params, groups, keep_top(groups, magnitude_importance(groups, params), 0.5))
  with pytest.raises(ValueError, match=r"bn1 \(BatchNorm\).*`mean` \(8,\)"):
    nnx_module(model, small_params)


# ----------------------------------------------------------------------------- Equinox


class EqxConvNet(eqx.Module):
  conv1: eqx.nn.Conv2d
  conv2: eqx.nn.Conv2d
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv1 = eqx.nn.Conv2d(3, 8, 3, padding=1, key=k1)
    self.conv2 = eqx.nn.Conv2d(8, 6, 3, padding=1, key=k2)
    self.head = eqx.nn.Linear(6, 2, key=k3)

  def __call__(self, x):
    h = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
    return self.head(h.mean(axis=(1, 2)))


class EqxNormed(eqx.Module):
  fc1: eqx.nn.Linear
  norm: eqx.nn.LayerNorm
  fc2: eqx.nn.Linear

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.fc1 = eqx.nn.Linear(4, 8, key=k1)
    self.norm = eqx.nn.LayerNorm(8)
    self.fc2 = eqx.nn.Linear(8, 3, key=k2)

  def __call__(self, x):
    return self.fc2(jax.nn.relu(self.norm(self.fc1(x))))


class EqxUpNet(eqx.Module):
  conv: eqx.nn.Conv2d
  up: eqx.nn.ConvTranspose2d
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.conv = eqx.nn.Conv2d(3, 6, 3, key=k1)
    self.up = eqx.nn.ConvTranspose2d(6, 4, 3, key=k2)
    self.head = eqx.nn.Linear(4, 2, key=k3)

  def __call__(self, x):
    h = jax.nn.relu(self.up(jax.nn.relu(self.conv(x))))
    return self.head(h.mean(axis=(1, 2)))


class EqxEmbed(eqx.Module):
  embed: eqx.nn.Embedding
  fc1: eqx.nn.Linear
  fc2: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.embed = eqx.nn.Embedding(10, 8, key=k1)
    self.fc1 = eqx.nn.Linear(8, 6, key=k2)
    self.fc2 = eqx.nn.Linear(6, 3, key=k3)

  def __call__(self, tokens):
    # A batch: under `vmap`, the Embedding's own `weight[token]` is a gather that
    # indexes the feature axis too (at 0), which channel_groups refuses.
    h = self.embed.weight[tokens]
    return jax.vmap(self.fc2)(jax.nn.relu(jax.vmap(self.fc1)(h)))


def _eqx_filled(build):
  return _filled(eqx.filter_eval_shape(build, jax.random.key(0)))


def _eqx_case(name):
  model = _eqx_filled({"mlp": lambda key: eqx.nn.MLP(4, 3, width_size=8, depth=2, key=key),
                       "conv": EqxConvNet, "up": EqxUpNet, "embed": EqxEmbed}[name])
  if name == "embed":
    return model, np.array([1, 4, 7], np.int32)
  x = np.random.default_rng(1).normal(size=(B, 4) if name == "mlp" else (B, 3, 5, 5))
  return model, x.astype(np.float32)


def _check_eqx_sizes(module):
  """(a): every rewritten field is read off the layer's arrays."""
  kinds = (eqx.nn.Linear, eqx.nn.Conv, eqx.nn.ConvTranspose, eqx.nn.LayerNorm,
           eqx.nn.Embedding)
  layers = [x for x in jax.tree.leaves(module, is_leaf=lambda x: isinstance(x, kinds))
            if isinstance(x, kinds)]
  for m in layers:
    if isinstance(m, eqx.nn.Linear):
      assert m.weight.shape == (m.out_features, m.in_features) and m.bias.shape == (
          m.out_features,)
    if isinstance(m, (eqx.nn.Conv, eqx.nn.ConvTranspose)):
      assert m.weight.shape[:2] == (m.out_channels, m.in_channels)
      assert m.bias.shape[0] == m.out_channels
    if isinstance(m, eqx.nn.Embedding):
      assert m.weight.shape == (m.num_embeddings, m.embedding_size)
    if isinstance(m, eqx.nn.LayerNorm):
      assert m.weight.shape == m.bias.shape == m.shape
  return layers


@pytest.mark.parametrize(("name", "form"), [
    ("mlp", "filtered"), ("mlp", "module"), ("conv", "filtered"), ("conv", "module"),
    ("up", "filtered"), ("embed", "module")])
def test_equinox_module(name, form):
  model, x = _eqx_case(name)
  params, static = eqx.partition(model, eqx.is_array)
  run = _eqx_run_batch if name == "embed" else _eqx_run
  if form == "filtered":
    apply_fn = lambda p, x: run(eqx.combine(p, static), x)
  else:  # the module itself as params
    params, apply_fn = model, run
  groups, keep, small = _shrunk(apply_fn, params, x)
  smaller = equinox_module(model, small)
  layers = _check_eqx_sizes(smaller)  # (a)
  widths = [getattr(m, "out_features", getattr(m, "out_channels", None)) or m.embedding_size
            for m in layers]
  assert widths == {"mlp": [4, 4, 3], "conv": [4, 3, 2], "up": [3, 2, 2],
                    "embed": [4, 3, 3]}[name]
  if name == "mlp":
    assert (smaller.in_size, smaller.width_size, smaller.out_size) == (4, 4, 3)
  out = run(smaller, x)
  _close(out, apply_fn(small, x))  # (b)
  _close(out, apply_fn(_zeroed(params, groups, keep), x))  # (c)


def test_equinox_module_norm():
  model = _eqx_filled(EqxNormed)
  x = np.random.default_rng(1).normal(size=(B, 4)).astype(np.float32)
  params, static = eqx.partition(model, eqx.is_array)
  apply_fn = lambda p, x: _eqx_run(eqx.combine(p, static), x)
  *_, small = _shrunk(apply_fn, params, x)
  smaller = equinox_module(model, small)
  _check_eqx_sizes(smaller)
  assert smaller.norm.shape == (4,) and smaller.fc1.out_features == 4
  # The stale module refuses its own input (eqx.nn.LayerNorm checks `shape`); the
  # rewritten one normalizes over the kept units.
  with pytest.raises(ValueError, match="shape"):
    apply_fn(small, x)
  h = x @ small.fc1.weight.T + small.fc1.bias
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
  expected = np.maximum(h * small.norm.weight + small.norm.bias, 0) @ small.fc2.weight.T
  _close(_eqx_run(smaller, x), expected + small.fc2.bias)


def test_equinox_module_refuses_wrong_params():
  model, x = _eqx_case("mlp")
  params = eqx.filter(model, eqx.is_array)
  with pytest.raises(ValueError, match="no leaf at layers/0/weight"):
    equinox_module(model, {"w": np.ones((4, 4))})
  broken = eqx.tree_at(lambda m: m.layers[1].bias, params, None, is_leaf=lambda v: v is None)
  with pytest.raises(ValueError, match="NoneType at layers/1/bias"):
    equinox_module(model, broken)
  static = eqx.filter(model, eqx.is_array, inverse=True)
  *_, small = _shrunk(lambda p, x: _eqx_run(eqx.combine(p, static), x), params, x)
  half = eqx.tree_at(lambda m: m.layers[1].bias, small, params.layers[1].bias)
  with pytest.raises(ValueError, match=r"layers/1 \(Linear\).*`bias` \(8,\)"):
    equinox_module(model, half)


def test_equinox_attention_sizes_or_a_refusal_never_a_guess():
  mha = eqx.nn.MultiheadAttention(4, 16, key=jax.random.key(0))  # 4 heads of 4
  x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
  arrays, static = eqx.partition(mha, eqx.is_array)
  apply_fn = lambda p, x: eqx.combine(p, static)(x, x, x)
  groups = channel_groups(apply_fn, arrays, x)
  kinds = {}
  for i in groups.prunable():
    kinds.setdefault(groups[i].kind, []).append(i)
  # Half the heads, or every head half as wide: the same rows. Refused, not guessed,
  # with the way out named.
  with pytest.raises(ValueError, match=r"MultiheadAttention.*do not tell how many heads.*"
                                       r"pass groups= and keep= \(what you gave shrink\)"):
    equinox_module(mha, shrink(arrays, groups, {kinds["heads"][0]: [0, 2]}))
  # Only the queries' and keys' head size narrowed: one reading.
  (qk,) = [i for i in kinds["head_dim"] if any(m.path.startswith("query") for m in
                                                 groups[i].members)]
  keep = {qk: [0, 1]}
  small = shrink(arrays, groups, keep)
  smaller = equinox_module(mha, small)
  assert (smaller.num_heads, smaller.qk_size, smaller.vo_size) == (4, 2, 4)
  # The module scales its scores by 1/sqrt(new qk_size); the shrunk program keeps the
  # dense 1/sqrt(4) (it equals zeroing): they differ by exactly that factor.
  scaled = eqx.tree_at(lambda m: m.query_proj.weight, smaller,
                       smaller.query_proj.weight * np.sqrt(2 / 4))
  np.testing.assert_allclose(scaled(x, x, x), shrunk_program(groups, keep)(small, x),
                             atol=1e-5, rtol=1e-5)


_mha_run = eqx.filter_jit(lambda mha, x: mha(x, x, x))


@functools.cache
def _eqx_mha(nested: bool):
  """A 4-head `eqx.nn.MultiheadAttention` (heads of 4) at the root, or at
  `blocks/0` of a dict: (module, x, arrays, apply_fn, groups, prunable groups by
  kind)."""
  mha = _eqx_filled(lambda key: eqx.nn.MultiheadAttention(4, 16, key=key))
  module = {"blocks": [mha]} if nested else mha
  x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
  arrays, static = eqx.partition(module, eqx.is_array)
  apply_fn = lambda p, x: _mha_run(_attn(eqx.combine(p, static)), x)
  groups = channel_groups(apply_fn, arrays, x)
  kinds = {}
  for i in groups.prunable():
    kinds.setdefault(groups[i].kind, []).append(i)
  return module, x, arrays, apply_fn, groups, kinds


def _attn(module):
  return module["blocks"][0] if isinstance(module, dict) else module


def test_equinox_attention_groups_of_eqx_mha():
  """What the tests below rely on: one heads group on q, k, v rows and the output's
  columns, one head_dim group on q and k rows, one on v rows and output columns."""
  *_, groups, kinds = _eqx_mha(False)
  paths = {i: sorted((m.path, m.axis, m.block, m.outer) for m in groups[i].members)
           for ids in kinds.values() for i in ids}
  assert sorted(kinds) == ["head_dim", "heads"] and len(kinds["heads"]) == 1
  assert paths[kinds["heads"][0]] == [("key_proj/weight", 0, 4, 1), (
      "output_proj/weight", 1, 4, 1), ("query_proj/weight", 0, 4, 1), (
      "value_proj/weight", 0, 4, 1)]
  assert sorted(paths[i] for i in kinds["head_dim"]) == [
      [("key_proj/weight", 0, 1, 4), ("query_proj/weight", 0, 1, 4)],
      [("output_proj/weight", 1, 1, 4), ("value_proj/weight", 0, 1, 4)]]


def _head_dims(groups, kinds):
  """The head_dim groups: (the queries' and keys', the values' and output's)."""
  on_q = lambda i: any(m.path.endswith("query_proj/weight") for m in groups[i].members)
  (qk,), (vo,) = ([i for i in kinds["head_dim"] if on_q(i) == want] for want in (True, False))
  return qk, vo


@pytest.mark.parametrize("nested", [False, True])
def test_equinox_attention_heads_removed(nested):
  module, x, arrays, apply_fn, groups, kinds = _eqx_mha(nested)
  keep = keep_top(groups, magnitude_importance(groups, arrays), {"heads": 0.5})
  assert list(keep) == kinds["heads"] and len(keep[kinds["heads"][0]]) == 2
  small = shrink(arrays, groups, keep)
  with pytest.raises(ValueError, match="do not tell how many heads"):
    equinox_module(module, small)  # 8 rows: 2 heads of 4, or 4 of 2
  attn = _attn(equinox_module(module, small, groups=groups, keep=keep))
  assert (attn.num_heads, attn.qk_size, attn.vo_size) == (2, 4, 4)
  assert (attn.query_size, attn.key_size, attn.value_size, attn.output_size) == (16,) * 4
  out = _mha_run(attn, x)
  _close(out, shrunk_program(groups, keep)(small, x))
  # Removing a head is zeroing its rows and the output's columns it feeds.
  _close(out, apply_fn(_zeroed(arrays, groups, keep), x))
  # The stale module runs on the small arrays, but as 4 heads of 2: another function.
  assert not np.allclose(apply_fn(small, x), out, atol=1e-3)


@pytest.mark.parametrize(("heads", "sizes"), [(None, (4, 2, 3)), ([1, 3], (2, 2, 3))])
def test_equinox_attention_head_dim_narrowed(heads, sizes):
  module, x, arrays, apply_fn, groups, kinds = _eqx_mha(True)
  qk, vo = _head_dims(groups, kinds)
  keep = {qk: [0, 2], vo: [0, 1, 3]} | ({} if heads is None else {kinds["heads"][0]: heads})
  small = shrink(arrays, groups, keep)
  attn = _attn(equinox_module(module, small, groups=groups, keep=keep))
  assert (attn.num_heads, attn.qk_size, attn.vo_size) == sizes
  out = _mha_run(attn, x)
  if heads is None:  # the stale module splits the rows into its 4 heads: it is right
    _close(out, apply_fn(small, x))
  # The module scales scores by 1/sqrt(new qk_size); the shrunk program (and zeroing)
  # keep the dense 1/sqrt(4): folding the ratio into the queries makes them equal.
  scaled = eqx.tree_at(lambda m: m.query_proj.weight, attn,
                       attn.query_proj.weight * np.sqrt(2 / 4))
  program = shrunk_program(groups, keep)(small, x)
  _close(_mha_run(scaled, x), program)
  _close(program, apply_fn(_zeroed(arrays, groups, keep), x))
  assert not np.allclose(out, program, atol=1e-3)  # the scale is not a no-op here


def test_equinox_module_groups_and_keep_errors():
  module, x, arrays, apply_fn, groups, kinds = _eqx_mha(True)
  keep = {kinds["heads"][0]: [0, 2]}
  small = shrink(arrays, groups, keep)
  with pytest.raises(ValueError, match="`keep` is missing"):
    equinox_module(module, small, groups=groups)
  with pytest.raises(ValueError, match="`groups` is missing"):
    equinox_module(module, small, keep=keep)
  # A keep that is not the one shrink took: 8 rows do not split into 3 heads.
  with pytest.raises(ValueError, match=r"blocks/0 \(MultiheadAttention\).*not split into the 3"):
    equinox_module(module, small, groups=groups, keep={kinds["heads"][0]: [0, 1, 2]})
  # Groups traced over another tree (the arrays under "m") name none of this layer's
  # arrays: the heads are not assumed unchanged.
  wrapped = channel_groups(lambda p, x: apply_fn(p["m"], x), {"m": arrays}, x)
  (head,) = [i for i in wrapped.prunable() if wrapped[i].kind == "heads"]
  other = shrink({"m": arrays}, wrapped, {head: [0, 2]})["m"]
  with pytest.raises(ValueError, match=r"blocks/0 \(MultiheadAttention\): no group .* holds "
                                       r"blocks/0/query_proj/weight"):
    equinox_module(module, other, groups=wrapped, keep={head: [0, 2]})
