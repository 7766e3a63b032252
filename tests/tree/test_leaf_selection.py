"""Tests of `select`, `leaf_paths`, `path_string`: choosing leaves by path."""

from __future__ import annotations

import fnmatch
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune


def path_components(path: tuple) -> tuple[str, ...]:
  """The components of a key path as `jaxprune.tree.path_string` names them, one by one."""
  return tuple(jaxprune.tree.path_string((key,)) for key in path)


def resolve_where(where, params, allow_empty=False) -> list[bool]:
  """One flag per leaf of `params`: does `where` select it? Read from `ranked_masks` (a
  mask at exactly the selected leaves), or, for a selection that may be empty, from
  the `targeted` column of `sparsity_report`."""
  if allow_empty:
    return [row.targeted for row in jaxprune.sparsity_report(params, where=where).leaves]
  masks = jaxprune.ranked_masks(params, 0.5, where)
  return [m is not None for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None)]


def f32(*shape):
  return np.zeros(shape, np.float32)


def transformer_params():
  block = lambda: {
      "attn": {"qkv": {"kernel": f32(4, 12), "bias": f32(12)},
               "output_proj": {"kernel": f32(4, 4), "bias": f32(4)}},
      "mlp": {"fc1": {"kernel": f32(4, 8), "bias": f32(8)},
              "fc2": {"kernel": f32(8, 4), "bias": f32(4)}},
      "ln": {"scale": f32(4)},
  }
  return {
      "embed": {"embedding": f32(10, 4)},
      "blocks": [block(), block()],
      "head": {"kernel": f32(4, 10)},
      "step": np.zeros((), np.int32),
  }


def chosen_paths(tree, where):
  return [p for p, sel in zip(jaxprune.tree.leaf_paths(tree), jax.tree.leaves(where)) if sel]


def test_default_selects_every_matrix_but_embeddings():
  params = transformer_params()
  where = jaxprune.select(params)
  assert jax.tree.structure(where) == jax.tree.structure(params)
  assert all(isinstance(b, bool) for b in jax.tree.leaves(where))
  assert chosen_paths(params, where) == [
      f"blocks/{i}/{name}/kernel"
      for i in range(2)
      for name in ["attn/output_proj", "attn/qkv", "mlp/fc1", "mlp/fc2"]
  ] + ["head/kernel"]


def test_lm_patterns_select_fc_and_output_proj_kernels():
  params = transformer_params()
  where = jaxprune.select(params, include=("output_proj", "fc*"))
  assert chosen_paths(params, where) == [
      f"blocks/{i}/{name}/kernel"
      for i in range(2)
      for name in ["attn/output_proj", "mlp/fc1", "mlp/fc2"]
  ]


def test_docstring_example():
  params = {"fc1": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
            "embed": {"embedding": jnp.ones((8, 4))}}
  assert jaxprune.select(params) == {"embed": {"embedding": False},
                                     "fc1": {"bias": False, "kernel": True}}
  assert jaxprune.select(params, include="fc1/kernel")["fc1"] == {"bias": False, "kernel": True}


def test_glob_matches_whole_components_only():
  params = {"my_fc1": {"kernel": f32(2, 2)}, "fc1x": {"kernel": f32(2, 2)},
            "xfc": {"kernel": f32(2, 2)}}
  where = jaxprune.select(params, include="fc*")
  assert chosen_paths(params, where) == ["fc1x/kernel"]
  where = jaxprune.select(params, include="*fc*")
  assert chosen_paths(params, where) == ["fc1x/kernel", "my_fc1/kernel", "xfc/kernel"]
  # Glob character classes and '?' work; matching is case-sensitive.
  params = {"fc1": f32(2, 2), "fc2": f32(2, 2), "fc3": f32(2, 2), "FC4": f32(2, 2)}
  assert chosen_paths(params, jaxprune.select(params, include="fc[12]")) == ["fc1", "fc2"]
  assert chosen_paths(params, jaxprune.select(params, include="fc?")) == ["fc1", "fc2", "fc3"]


def test_exclude_overrides_include():
  params = transformer_params()
  where = jaxprune.select(params, include=("fc*", "output_proj"), exclude=("fc2", "1"))
  assert chosen_paths(params, where) == ["blocks/0/attn/output_proj/kernel",
                                         "blocks/0/mlp/fc1/kernel"]
  # A single string for exclude.
  where = jaxprune.select(params, include="*", exclude="blocks")
  assert chosen_paths(params, where) == ["embed/embedding", "head/kernel"]


def test_sequence_index_is_a_component():
  params = {"layers": [f32(2, 2), f32(3, 3), f32(4, 4)]}
  assert chosen_paths(params, jaxprune.select(params, include="1")) == ["layers/1"]
  assert chosen_paths(params, jaxprune.select(params, include=("0", "2"))) == ["layers/0",
                                                                              "layers/2"]
  params = {"stack": (f32(2, 2), [f32(2, 2), f32(2, 2)])}
  assert jaxprune.tree.leaf_paths(params) == ["stack/0", "stack/1/0", "stack/1/1"]
  where = jaxprune.select(params, include="stack", exclude="0")
  assert chosen_paths(params, where) == ["stack/1/1"]


def test_min_ndim():
  params = transformer_params()
  where = jaxprune.select(params, include="fc1", min_ndim=1)
  assert chosen_paths(params, where) == [f"blocks/{i}/mlp/fc1/{leaf}" for i in range(2)
                                         for leaf in ["bias", "kernel"]]
  params = {"fc1": {"kernel": f32(2, 2), "conv": f32(3, 3, 2, 2)}}
  assert chosen_paths(params, jaxprune.select(params, min_ndim=3)) == ["fc1/conv"]
  # min_ndim=0 admits scalars.
  params = {"fc1": {"kernel": f32(2, 2), "gain": np.float32(1.0) * np.ones((), np.float32)}}
  assert chosen_paths(params, jaxprune.select(params, min_ndim=0)) == ["fc1/gain", "fc1/kernel"]


@pytest.mark.parametrize(
    "leaf",
    [np.zeros((3, 3), np.int32), np.zeros((3, 3), bool), np.zeros((3, 3), np.uint8), 1.5, 3, None,
     "fc1", jnp.zeros((3, 3), jnp.int8)],
    ids=["int32", "bool", "uint8", "pyfloat", "pyint", "none", "str", "jnp-int8"],
)
def test_only_floating_arrays_are_selected(leaf):
  params = {"fc1": {"kernel": f32(2, 2), "other": leaf}}
  where = jaxprune.select(params, min_ndim=0)
  assert where["fc1"]["kernel"] is True
  if leaf is not None:
    assert where["fc1"]["other"] is False


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_float_dtypes_and_shape_dtype_structs(dtype):
  params = {"fc1": {"kernel": jnp.zeros((2, 3), dtype),
                    "abstract": jax.ShapeDtypeStruct((4, 4), dtype),
                    "abstract_int": jax.ShapeDtypeStruct((4, 4), jnp.int32)}}
  where = jaxprune.select(params)
  assert where == {"fc1": {"kernel": True, "abstract": True, "abstract_int": False}}


def test_callable_include_gets_joined_path_and_leaf():
  params = transformer_params()
  seen = []

  def include(path, leaf):
    seen.append((path, np.shape(leaf)))
    return path.endswith("qkv/kernel") and leaf.shape[1] == 12

  where = jaxprune.select(params, include=include)
  assert chosen_paths(params, where) == ["blocks/0/attn/qkv/kernel", "blocks/1/attn/qkv/kernel"]
  assert ("blocks/0/attn/output_proj/kernel", (4, 4)) in seen
  # The callable only sees leaves that pass the other filters (float, ndim, exclude).
  assert all(len(shape) >= 2 for _, shape in seen)
  assert not any(p == "step" for p, _ in seen)
  # exclude and min_ndim still apply to a callable include.
  where = jaxprune.select(params, include=lambda p, w: True, exclude="blocks")
  assert chosen_paths(params, where) == ["embed/embedding", "head/kernel"]


def test_nothing_selected_lists_patterns_and_paths():
  params = transformer_params()
  with pytest.raises(ValueError, match=r"select: no leaf matched include=\('nope\*',\)") as err:
    jaxprune.select(params, include=("nope*",))
  msg = str(err.value)
  assert ", ".join(jaxprune.tree.leaf_paths(params)[:8]) in msg  # the first paths that exist
  assert "exclude=()" in msg and "min_ndim=2" in msg
  assert f"{len(jaxprune.tree.leaf_paths(params))} leaves" in msg
  assert msg.endswith(", ...")  # more than 8 leaves: the list is cut
  excluded = r"exclude=\('\*embed\*', 'bias', 'scale', 'fc\*'\).*fc1/kernel"
  with pytest.raises(ValueError, match=excluded):
    jaxprune.select({"fc1": {"kernel": f32(2, 2)}}, exclude=("fc*",))
  with pytest.raises(ValueError, match=r"min_ndim=3"):
    jaxprune.select({"fc1": {"kernel": f32(2, 2)}}, min_ndim=3)
  with pytest.raises(ValueError, match=re.escape("(none)")):
    jaxprune.select({})


def test_non_string_patterns_are_rejected():
  with pytest.raises(TypeError, match=r"`include` patterns must be strings, got 3"):
    jaxprune.select({"fc1": f32(2, 2)}, include=("fc1", 3))
  with pytest.raises(TypeError, match=r"`exclude` patterns must be strings, got None"):
    jaxprune.select({"fc1": f32(2, 2)}, exclude=[None])


class Dense(NamedTuple):
  kernel: np.ndarray
  bias: np.ndarray


def test_namedtuple_fields_are_components():
  params = {"fc": Dense(kernel=f32(2, 3), bias=f32(3)), "out": [Dense(f32(3, 3), f32(3))]}
  assert jaxprune.tree.leaf_paths(params) == ["fc/kernel", "fc/bias", "out/0/kernel", "out/0/bias"]
  where = jaxprune.select(params, include="kernel")
  assert isinstance(where["fc"], Dense) and isinstance(where["out"][0], Dense)
  assert chosen_paths(params, where) == ["fc/kernel", "out/0/kernel"]


def test_nnx_state_paths_and_selection():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(3, 4, rngs=rngs)
      self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs)])
      self.output_proj = nnx.Linear(4, 2, rngs=rngs)

  graphdef, state = nnx.split(nnx.eval_shape(lambda: Model(nnx.Rngs(0))))
  state = nnx.state(nnx.merge(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                                    state)), nnx.Param)
  paths = jaxprune.tree.leaf_paths(state)
  assert "fc1/kernel/value" in paths and "blocks/0/kernel/value" in paths
  where = jaxprune.select(state, include=("fc*", "output_proj"))
  assert jax.tree.structure(where) == jax.tree.structure(state)
  assert chosen_paths(state, where) == ["fc1/kernel/value", "output_proj/kernel/value"]
  where = jaxprune.select(state, include="blocks")
  assert chosen_paths(state, where) == ["blocks/0/kernel/value"]


def test_path_components_of_key_types():
  path = (jax.tree_util.DictKey("blocks"), jax.tree_util.SequenceKey(0),
          jax.tree_util.GetAttrKey("kernel"), jax.tree_util.FlattenedIndexKey(2))
  assert path_components(path) == ("blocks", "0", "kernel", "2")
  assert jaxprune.tree.path_string(path) == "blocks/0/kernel/2"
  # Non-string dict keys become strings.
  params = {"fc": {1: f32(2, 2), 2: f32(2, 2)}}
  assert jaxprune.tree.leaf_paths(params) == ["fc/1", "fc/2"]
  assert chosen_paths(params, jaxprune.select(params, include="2")) == ["fc/2"]


def test_resolve_where_gives_one_flag_per_slot():
  params = {"fc1": f32(2, 2), "b": f32(2)}  # slots in key order: b, fc1
  assert resolve_where(jaxprune.select, params) == [False, True]
  assert resolve_where({"fc1": np.bool_(True), "b": False}, params) == [False, True]
  assert resolve_where({"fc1": jnp.bool_(True), "b": None}, params) == [False, True]
  with pytest.raises(ValueError, match=r"`where` has 1 slots but params have 2"):
    resolve_where({"fc1": True}, params)
  with pytest.raises(ValueError, match=r"`where` has a leaf at a where params have b"):
    resolve_where({"fc1": True, "a": False}, params)
  with pytest.raises(TypeError, match=r"`where` at b must be a bool.*got 0"):
    resolve_where({"fc1": True, "b": 0}, params)
  with pytest.raises(ValueError, match=r"`where` selects no leaf"):
    resolve_where({"fc1": False, "b": False}, params)
  assert resolve_where({"fc1": False, "b": False}, params, allow_empty=True) == [False, False]


# ----------------------------------------------------------------------------- properties

NAMES = ["fc1", "fc2", "output_proj", "attn", "mlp", "kernel", "bias", "embed"]
PATTERNS = ["fc*", "output_proj", "*proj", "kernel", "bias", "mlp", "0", "1", "f?2", "*"]


def leaves():
  return st.one_of(
      st.sampled_from([(2, 2), (3,), (), (2, 1, 2)]).map(lambda s: np.zeros(s, np.float32)),
      st.sampled_from([(2, 2), (3,)]).map(lambda s: np.zeros(s, np.int32)),
      st.sampled_from([(2, 2), (3,)]).map(lambda s: np.zeros(s, jnp.bfloat16)),
  )


trees = st.recursive(
    leaves(),
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from(NAMES), children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3),
        st.tuples(children, children),
    ),
    max_leaves=10,
)


def reference_select(tree, include, exclude, min_ndim):
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    parts = path_components(path)
    ok = (
        jnp.issubdtype(leaf.dtype, jnp.floating)
        and leaf.ndim >= min_ndim
        and any(fnmatch.fnmatchcase(c, p) for c in parts for p in include)
        and not any(fnmatch.fnmatchcase(c, p) for c in parts for p in exclude)
    )
    out.append(bool(ok))
  return out


@settings(max_examples=60, deadline=None)
@given(
    tree=trees,
    include=st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=3),
    exclude=st.lists(st.sampled_from(PATTERNS), max_size=2),
    min_ndim=st.integers(0, 3),
)
def test_select_property(tree, include, exclude, min_ndim):
  expected = reference_select(tree, include, exclude, min_ndim)
  if not any(expected):
    with pytest.raises(ValueError, match="select: no leaf matched"):
      jaxprune.select(tree, include=include, exclude=exclude, min_ndim=min_ndim)
    return
  where = jaxprune.select(tree, include=include, exclude=exclude, min_ndim=min_ndim)
  assert jax.tree.structure(where) == jax.tree.structure(tree)
  assert jax.tree.leaves(where) == expected
  # Adding an exclude pattern never selects more; a callable include agrees with globs.
  by_callable = jaxprune.select(
      tree,
      include=lambda path, leaf: any(fnmatch.fnmatchcase(c, p) for c in path.split("/")
                                     for p in include),
      exclude=exclude,
      min_ndim=min_ndim,
  )
  assert jax.tree.leaves(by_callable) == expected
