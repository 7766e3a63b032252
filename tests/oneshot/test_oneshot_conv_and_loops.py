"""One-shot pruning of convolution kernels and of stacked leaves indexed in a loop
(issue 28, items 4 and 7), against NumPy.

Convolutions: `input_statistics` records a kernel's unfolded input patches (im2col,
as OBC and SparseGPT prune ResNets), over the kernel's `(*spatial, in)` axes; here
an independent NumPy im2col (pinned to the model by reproducing its output) gives
the expected norms and Gram matrix, and Wanda's masks and SparseGPT's weights are
checked per output channel against NumPy transcriptions of the papers. Loops:
`for i in range(L): x = x @ w[i]` and `lax.fori_loop` (static and traced bounds)
over a stacked `(L, in, out)` leaf get one statistic per layer, from what that
layer's slice multiplied."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from numpy_references import slots, sparsegpt_reference

import jaxprune

# ----------------------------------------------------------------------------- references


def same_pads(size, k, stride, dilation):
  """`SAME` padding of one spatial axis (as XLA pads: the extra one after)."""
  span = (k - 1) * dilation + 1
  out = -(-size // stride)
  total = max((out - 1) * stride + span - size, 0)
  return total // 2, total - total // 2


def im2col(x, k, stride, padding, dilation):
  """Patches of NHWC `x` for a `k`x`k` kernel: `(rows, kh, kw, c)`, one row per
  output position `(n, oy, ox)`; row `(n, oy, ox)`, entry `(ky, kx, c)` is the input
  pixel that kernel tap `(ky, kx)` reads there (zero in the padding)."""
  n, h, w, c = x.shape
  if padding == "SAME":
    pads = [same_pads(s, k, stride, dilation) for s in (h, w)]
  else:
    pads = [(0, 0), (0, 0)]
  xp = np.pad(np.asarray(x, np.float64), [(0, 0), *pads, (0, 0)])
  span = (k - 1) * dilation + 1
  oh = (xp.shape[1] - span) // stride + 1
  ow = (xp.shape[2] - span) // stride + 1
  out = np.zeros((n, oh, ow, k, k, c))
  for oy in range(oh):
    for ox in range(ow):
      for ky in range(k):
        for kx in range(k):
          out[:, oy, ox, ky, kx] = xp[:, oy * stride + ky * dilation, ox * stride + kx * dilation]
  return out.reshape(n * oh * ow, k, k, c)


def wanda_reference(w, sq_norms, sparsity):
  """Wanda's masks of `w` `(rows, cols)` (rows the output neurons): each row keeps
  all but its `round(s · cols)` lowest `|w| · ||x_j||` (ties by position)."""
  score = np.abs(np.asarray(w, np.float64)) * np.sqrt(np.asarray(sq_norms, np.float64))
  rank = np.argsort(np.argsort(score, axis=1, kind="stable"), axis=1, kind="stable")
  return rank >= round(sparsity * w.shape[1])


def nm_reference(score, n, m):
  """Keeps the `n` best of every `m` consecutive entries of each row of `score`."""
  groups = score.reshape(score.shape[0], -1, m)
  best = np.argsort(-groups, axis=-1, kind="stable")[..., :n]
  kept = np.zeros(groups.shape, bool)
  np.put_along_axis(kept, best, True, axis=-1)
  return kept.reshape(score.shape)


def by_path(tree):
  """`{path: array}` of a pytree's array leaves, paths without NNX's `/value`."""
  theirs = slots(tree)
  return {p.removesuffix("/value"): np.asarray(x)
          for p, x in zip(theirs.paths, theirs.leaves) if x is not None}


# ----------------------------------------------------------------------------- convolutions

C_IN, C_OUT, K, STRIDE = 4, 6, 3, 2
X_NHWC = np.asarray(jax.random.normal(jax.random.key(1), (4, 9, 9, C_IN)))


def _nnx_hwio(padding, dilation):
  conv = nnx.Conv(C_IN, C_OUT, kernel_size=(K, K), strides=STRIDE, padding=padding,
                  kernel_dilation=dilation, use_bias=False, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(conv)
  return dict(params=state, path="kernel", x=jnp.asarray(X_NHWC), features=(0, 1, 2),
              apply=lambda s, x: nnx.merge(graphdef, s)(x),
              out_rows=lambda y: y.reshape(-1, C_OUT),
              rows=lambda k: k.transpose(3, 0, 1, 2).reshape(C_OUT, -1),  # (o, ky, kx, c)
              patches=lambda p: p)


def _equinox_oihw(padding, dilation):
  conv = eqx.nn.Conv2d(C_IN, C_OUT, K, stride=STRIDE, padding=padding, dilation=dilation,
                       use_bias=False, key=jax.random.key(2))
  return dict(params=conv, path="weight", x=jnp.asarray(X_NHWC.transpose(0, 3, 1, 2)),
              features=(2, 3, 1), apply=lambda m, x: jax.vmap(m)(x),
              out_rows=lambda y: y.transpose(0, 2, 3, 1).reshape(-1, C_OUT),
              rows=lambda k: k.transpose(0, 2, 3, 1).reshape(C_OUT, -1),  # (o, ky, kx, c)
              patches=lambda p: p)


def _lax_oiwh_chwn(padding, dilation):
  # The kernel's spatial axes lie in the other order (kx before ky): its features
  # are (kx, ky, in), the order they lie in the kernel; the output puts its batch
  # axis after its feature axis.
  kernel = jax.random.normal(jax.random.key(3), (C_OUT, C_IN, K, K))

  def apply(p, x):
    return lax.conv_general_dilated(x, p["k"], (STRIDE, STRIDE), padding,
                                    rhs_dilation=(dilation, dilation),
                                    dimension_numbers=("NHWC", "OIWH", "CHWN"))

  return dict(params={"k": kernel}, path="k", x=jnp.asarray(X_NHWC), features=(2, 3, 1),
              apply=apply, out_rows=lambda y: y.transpose(3, 1, 2, 0).reshape(-1, C_OUT),
              rows=lambda k: k.transpose(0, 2, 3, 1).reshape(C_OUT, -1),  # (o, kx, ky, c)
              patches=lambda p: p.transpose(0, 2, 1, 3))


CONVS = {"HWIO nnx.Conv": _nnx_hwio, "OIHW equinox Conv2d": _equinox_oihw,
         "OIWH kernel CHWN output lax": _lax_oiwh_chwn}
PADDINGS = {"SAME dilation 2": ("SAME", 2), "VALID dilation 1": ("VALID", 1)}


def _where(params, path):
  theirs = slots(params)
  flags = [None if x is None else p.removesuffix("/value") == path
           for p, x in zip(theirs.paths, theirs.leaves)]
  return jax.tree.unflatten(theirs.treedef, flags)


@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("layout", list(CONVS))
def test_conv_kernels_get_their_unfolded_patches_and_prune_per_output_channel(layout, padding):
  pad, dilation = PADDINGS[padding]
  model = CONVS[layout](pad, dilation)
  params, path, x = model["params"], model["path"], model["x"]
  where = _where(params, path)
  stats = jaxprune.oneshot.input_statistics(model["apply"], params, [x], where, gram=True)
  assert stats.unattributed == {}
  (s,) = stats.leaves.values()
  kernel = by_path(params)[path]
  w_rows = model["rows"](kernel)                              # (out, inputs) as recorded
  patches = model["patches"](im2col(X_NHWC, K, STRIDE, pad, dilation))
  flat = patches.reshape(len(patches), -1)
  # The reference reads what the model computes: its patches times the kernel.
  np.testing.assert_allclose(flat @ w_rows.T, model["out_rows"](np.asarray(
      model["apply"](params, x))), rtol=1e-4, atol=1e-4)
  assert s.stack_axes == () and s.feature_axes == model["features"]
  assert s.rows == len(patches)
  np.testing.assert_allclose(np.asarray(s.sq_norms), (patches ** 2).sum(0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s.gram), flat.T @ flat, rtol=1e-5, atol=1e-4)

  # Wanda: each output channel keeps the best half of its (ky, kx, c) inputs.
  score = jaxprune.scores.wanda_score(stats)
  wanda = by_path(jaxprune.Prune(0.5, score=score, scope="row").masks(params, where))[path]
  sq = flat.T.dot(flat).diagonal()
  np.testing.assert_array_equal(model["rows"](wanda), wanda_reference(w_rows, sq, 0.5))
  # Wanda 2:4: groups of 4 consecutive inputs, i.e. along the input channels.
  nm = by_path(jaxprune.NM(2, 4, score=score).masks(params, where))[path]
  np.testing.assert_array_equal(model["rows"](nm), nm_reference(np.abs(w_rows) * np.sqrt(sq),
                                                                2, 4))

  # SparseGPT per output channel over the flattened patch, against the paper.
  for sparsity, pattern in ((0.5, None), (0.0, (2, 4))):
    new, masks = jaxprune.oneshot.sparsegpt(params, stats, sparsity, where, nm=pattern)
    want_w, want_kept = sparsegpt_reference(w_rows, flat.T @ flat, sparsity, pattern)
    np.testing.assert_array_equal(model["rows"](by_path(masks)[path]), want_kept)
    np.testing.assert_allclose(model["rows"](by_path(new)[path]), want_w, atol=2e-3)


class _ConvNet(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 8, kernel_size=(3, 3), strides=2, padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), kernel_dilation=2, padding="SAME",
                          rngs=rngs)
    self.head = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.conv2(nnx.relu(self.conv1(x))))
    return self.head(h.mean(axis=(1, 2)))


def test_sparsegpt_beats_magnitude_on_a_tiny_conv_net():
  graphdef, state = nnx.split(_ConvNet(nnx.Rngs(0)))
  apply = lambda s, x: nnx.merge(graphdef, s)(x)
  rng = np.random.default_rng(0)
  calibration = [jnp.asarray(rng.standard_normal((8, 12, 12, 3)), jnp.float32)
                 for _ in range(2)]
  where = jaxprune.select(state, include="kernel")
  stats = jaxprune.oneshot.input_statistics(apply, state, calibration, where, gram=True)
  assert stats.unattributed == {} and len(stats.leaves) == 3
  new, masks = jaxprune.oneshot.sparsegpt(state, stats, 0.5, where, block=16)
  magnitude = jaxprune.apply_masks(state, jaxprune.ranked_masks(state, 0.5, where))
  wanda = jaxprune.apply_masks(state, jaxprune.Prune(
      0.5, score=jaxprune.scores.wanda_score(stats), scope="row").masks(state, where))
  for kept in by_path(masks).values():
    if kept.dtype == bool:
      assert int((~kept).sum()) == kept.size // 2
  x = jnp.concatenate(calibration)
  dense = np.asarray(apply(state, x))
  loss = lambda p: float(np.mean((np.asarray(apply(p, x)) - dense) ** 2))
  assert loss(new) <= loss(magnitude)
  assert np.isfinite(loss(wanda))


def test_a_grouped_conv_is_refused_naming_the_primitive_and_the_line():
  conv = nnx.Conv(C_IN, C_OUT, kernel_size=(K, K), feature_group_count=2, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(conv)
  apply = lambda s, x: nnx.merge(graphdef, s)(x)
  where = jaxprune.select(state, include="kernel")
  stats = jaxprune.oneshot.input_statistics(apply, state, [jnp.asarray(X_NHWC)], where, gram=True)
  (why,) = stats.unattributed.values()
  assert "conv_general_dilated" in why and "feature_group_count=2" in why
  assert ".py:" in why                                       # the source line
  with pytest.raises(ValueError, match="feature_group_count=2"):
    jaxprune.oneshot.sparsegpt(state, stats, 0.5, where)
  with pytest.raises(ValueError, match="feature_group_count=2"):
    jaxprune.Prune(0.5, score=jaxprune.scores.wanda_score(stats), scope="row").masks(state, where)


# ----------------------------------------------------------------------------- w[i] in loops

LAYERS, WIDTH = 3, 8
STACK = jax.random.normal(jax.random.key(4), (LAYERS, WIDTH, WIDTH)) / 3
X = np.asarray(jax.random.normal(jax.random.key(5), (6, 5, WIDTH)))


def _python_loop(p, x):
  for i in range(LAYERS):
    x = jnp.tanh(x @ p["w"][i])
  return x


def _fori_loop(p, x):
  return lax.fori_loop(0, LAYERS, lambda i, h: jnp.tanh(h @ p["w"][i]), x)


def _fori_loop_traced_bounds(p, x):
  # Bounds computed from the data: a `while` loop, the index known only at run time.
  stop = (x[0, 0, 0] * 0).astype(jnp.int32) + LAYERS
  return lax.fori_loop(0, stop, lambda i, h: jnp.tanh(h @ p["w"][i]), x)


def _python_loop_take(p, x):
  for i in range(LAYERS):
    x = jnp.tanh(x @ jnp.take(p["w"], i, axis=0))
  return x


LOOPS = {"python loop w[i]": _python_loop, "fori_loop": _fori_loop,
         "fori_loop traced bounds": _fori_loop_traced_bounds,
         "python loop jnp.take": _python_loop_take}


def _layer_inputs():
  h, out = np.asarray(X, np.float64), []
  for i in range(LAYERS):
    out.append(h.reshape(-1, WIDTH))
    h = np.tanh(h @ np.asarray(STACK[i], np.float64))
  return out


@pytest.mark.parametrize("loop", list(LOOPS))
def test_each_stacked_layer_indexed_in_a_loop_gets_its_own_statistics(loop):
  params, where = {"w": STACK}, {"w": True}
  stats = jaxprune.oneshot.input_statistics(LOOPS[loop], params, [jnp.asarray(X)], where, gram=True)
  assert stats.unattributed == {}
  s = stats.leaves["w"]
  assert s.stack_axes == (0,) and s.feature_axes == (1,) and s.rows == 30
  inputs = _layer_inputs()
  np.testing.assert_allclose(np.asarray(s.sq_norms), np.stack([(h * h).sum(0) for h in inputs]),
                             rtol=1e-4)
  np.testing.assert_allclose(np.asarray(s.gram), np.stack([h.T @ h for h in inputs]),
                             rtol=1e-4, atol=1e-4)
  # Wanda: per layer, each output neuron (column) keeps its best half.
  wanda = np.asarray(jaxprune.Prune(0.5, score=jaxprune.scores.wanda_score(stats), scope="row")
                     .masks(params, where)["w"])
  for i, h in enumerate(inputs):
    w_rows = np.asarray(STACK[i]).T                          # (out, in)
    np.testing.assert_array_equal(wanda[i].T, wanda_reference(w_rows, (h * h).sum(0), 0.5))
  # SparseGPT: each layer from its own Gram matrix.
  for sparsity, pattern in ((0.5, None), (0.0, (2, 4))):
    new, masks = jaxprune.oneshot.sparsegpt(params, stats, sparsity, where, nm=pattern)
    for i, h in enumerate(inputs):
      want_w, want_kept = sparsegpt_reference(np.asarray(STACK[i]).T, h.T @ h, sparsity,
                                              pattern)
      np.testing.assert_array_equal(np.asarray(masks["w"][i]).T, want_kept)
      np.testing.assert_allclose(np.asarray(new["w"][i]).T, want_w, atol=2e-3)


def test_a_layer_the_loop_never_reaches_and_a_gather_of_layers_are_named():
  params, where = {"w": STACK}, {"w": True}

  def skips_last(p, x):
    for i in range(LAYERS - 1):
      x = jnp.tanh(x @ p["w"][i])
    return x

  stats = jaxprune.oneshot.input_statistics(skips_last, params, [jnp.asarray(X)], where, gram=True)
  with pytest.raises(ValueError, match=rf"inputs of w\[{LAYERS - 1}\] are all zero"):
    jaxprune.oneshot.sparsegpt(params, stats, 0.5, where)

  def two_layers_at_once(p, x):
    return jnp.einsum("btd,lde->lbte", x, jnp.take(p["w"], jnp.array([0, 2]), axis=0))

  stats = jaxprune.oneshot.input_statistics(two_layers_at_once, params, [jnp.asarray(X)], where)
  assert "gather" in stats.unattributed["w"] and ".py:" in stats.unattributed["w"]
  with pytest.raises(ValueError, match=r"no input statistics for w: .*gather"):
    jaxprune.Prune(0.5, score=jaxprune.scores.wanda_score(stats), scope="row").masks(params, where)
