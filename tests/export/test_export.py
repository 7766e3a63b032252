"""Tests of `export_compressed`, `load_compressed`, `export_info`.

The file is also parsed here by hand from the documented layout (prelude, JSON
header, payload, SHA-256), so the documentation is tested too.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.export import (
    CompressedFormatError,
    export_compressed,
    export_info,
    load_compressed,
)

RNG = np.random.default_rng(0)

# The documented file layout (`jaxprune.export`): the magic bytes, and the newest
# format version this jaxprune writes and reads.
MAGIC = b"JXPRUNE1"
FORMAT_VERSION = 2


def normal(shape, dtype=np.float32):
  return jnp.asarray(RNG.standard_normal(shape), dtype)


def is_none(x):
  return x is None


def parse(path):
  """(version, header dict, payload bytes) by the documented layout."""
  with open(path, "rb") as f:
    data = f.read()
  magic, version, header_len, payload_len = struct.unpack_from("<8sIQQ", data)
  assert magic == MAGIC
  end = 28 + header_len + payload_len
  assert len(data) == end + 32
  assert hashlib.sha256(data[:end]).digest() == data[end:]
  return version, json.loads(data[28 : 28 + header_len]), data[28 + header_len : end]


def bits(x):
  """Bit patterns of an array, for bitwise comparison (any dtype)."""
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}")) if x.dtype.itemsize in (1, 2, 4, 8) else x


def model():
  """Nested dict/list/tuple params: targeted f32 and bf16 leaves, odd sizes, int and
  bf16 untargeted leaves, an empty dict and a None."""
  params = {
      "fc1": {"kernel": normal((5, 8)), "bias": normal((8,))},
      "fc2": {"kernel": normal((8, 3), jnp.bfloat16), "bias": normal((3,), jnp.bfloat16)},
      "output_proj": {"kernel": normal((3, 5))},
      "odd": [normal((7,)), (normal((1, 1)),)],
      "embed": normal((4, 2)),
      "step": jnp.asarray(7, jnp.int32),
      "counts": np.arange(5, dtype=np.int64),
      "empty": {},
      "nothing": None,
  }
  where = jax.tree.map(lambda x: False, params)
  where["fc1"]["kernel"] = where["fc2"]["kernel"] = where["output_proj"]["kernel"] = True
  where["odd"] = [True, (True,)]
  return params, random_masks(params, where, 0.6)


def random_masks(params, where, sparsity):
  """A mask tree keeping each selected weight with probability 1 - sparsity (NumPy)."""
  return jax.tree.map(
      lambda x, s: jnp.asarray(RNG.random(np.shape(x)) >= sparsity) if s else None, params, where
  )


def aligned(params, masks, loaded):
  """(path, param, mask, loaded leaf) per non-None leaf; None counts as a leaf in all three."""
  with_path = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_none)[0]
  out = zip(with_path, jax.tree.leaves(masks, is_leaf=is_none),
            jax.tree.leaves(loaded, is_leaf=is_none))
  return [(jaxprune.tree.path_string(p), w, m, got) for (p, w), m, got in out if w is not None]


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    assert np.shape(x) == np.shape(y)
    np.testing.assert_array_equal(bits(x), bits(y))


# ----------------------------------------------------------------------------- round trip


def test_float32_round_trip_is_bitwise(tmp_path):
  params, masks = model()
  path = tmp_path / "m.jxp"
  export_compressed(path, params, masks)
  loaded, loaded_masks = load_compressed(path, with_masks=True)
  assert_bitwise_equal(loaded, jaxprune.apply_masks(params, masks))
  # Containers: same types, key order, empty dict and None kept.
  assert list(loaded) == list(params)
  assert isinstance(loaded["odd"], list) and isinstance(loaded["odd"][1], tuple)
  assert loaded["empty"] == {} and loaded["nothing"] is None
  assert isinstance(loaded["fc1"]["kernel"], np.ndarray)
  # Masks come back too, and fit the loaded params.
  jaxprune.check_masks(loaded_masks, loaded)
  for _, m, ref, _ in aligned(loaded_masks, masks, masks):
    assert (m is None) == (ref is None)
    if m is not None:
      np.testing.assert_array_equal(m, ref)


def test_negative_zero_and_unmasked_export(tmp_path):
  w = jnp.array([[-0.0, 1.0], [2.0, -3.0]])
  params = {"fc1": {"kernel": w}}
  masks = {"fc1": {"kernel": jnp.array([[True, False], [True, True]])}}
  export_compressed(tmp_path / "a", params, masks)
  np.testing.assert_array_equal(bits(load_compressed(tmp_path / "a")["fc1"]["kernel"]),
                                bits(jnp.array([[-0.0, 0.0], [2.0, -3.0]])))
  export_compressed(tmp_path / "b", params)  # No masks: all dense.
  assert_bitwise_equal(load_compressed(tmp_path / "b"), params)
  assert export_info(tmp_path / "b").targeted_bytes == 0


@pytest.mark.parametrize("shape", [(3, 5), (7,), (1, 1), (2, 3, 3), (0, 4)])
def test_bitmask_packing_at_odd_sizes(tmp_path, shape):
  w = normal(shape)
  mask = jnp.asarray(RNG.random(shape) < 0.5)
  export_compressed(tmp_path / "m", {"w": w}, {"w": mask})
  _, header, payload = parse(tmp_path / "m")
  (entry,) = header["leaves"]
  size = int(np.prod(shape))
  offset, length = entry["sections"]["mask"]
  assert length == -(-size // 8)
  np.testing.assert_array_equal(
      np.unpackbits(np.frombuffer(payload, np.uint8, length, offset), count=size),
      np.asarray(mask).reshape(-1),
  )
  assert entry["kept"] == int(mask.sum())
  loaded, loaded_mask = load_compressed(tmp_path / "m", with_masks=True)
  np.testing.assert_array_equal(loaded["w"], np.where(mask, w, 0))
  np.testing.assert_array_equal(loaded_mask["w"], mask)


class Pair(NamedTuple):
  kernel: jax.Array
  bias: jax.Array


def test_other_pytree_nodes_load_as_dicts_keyed_by_path(tmp_path):
  params = {"fc1": Pair(normal((4, 4)), normal((4,)))}
  masks = random_masks(params, jaxprune.select(params), 0.5)
  export_compressed(tmp_path / "m", params, masks)
  loaded, loaded_masks = load_compressed(tmp_path / "m", with_masks=True)
  assert isinstance(loaded["fc1"], dict) and set(loaded["fc1"]) == {"kernel", "bias"}
  # Same path strings; a dict's leaves come in sorted key order, a NamedTuple's in field order.
  assert sorted(jaxprune.tree.leaf_paths(loaded)) == sorted(jaxprune.tree.leaf_paths(params))
  jaxprune.check_masks(loaded_masks, loaded)
  assert loaded_masks["fc1"]["bias"] is None
  np.testing.assert_array_equal(loaded_masks["fc1"]["kernel"], masks["fc1"].kernel)
  np.testing.assert_array_equal(loaded["fc1"]["kernel"],
                                np.where(masks["fc1"].kernel, params["fc1"].kernel, 0))


# ----------------------------------------------------------------------------- lossy values


def test_bfloat16_values_error_bound(tmp_path):
  params, masks = model()
  export_compressed(tmp_path / "m", params, masks, values="bfloat16")
  loaded = load_compressed(tmp_path / "m")
  rounded = []
  for _, w, m, got in aligned(params, masks, loaded):
    if m is None:
      np.testing.assert_array_equal(bits(got), bits(w))
      continue
    w32 = np.asarray(jnp.asarray(w, jnp.float32))
    got32 = np.asarray(got, np.float32)
    m = np.asarray(m)
    assert (got32[~m] == 0).all()
    # Round to nearest with an 8-bit significand: relative error at most 2**-8.
    assert (np.abs(got32 - w32)[m] <= np.abs(w32[m]) * 2.0**-8).all()
    if np.asarray(w).dtype == np.float32:
      rounded.append((got32 != w32)[m])
  # Really rounded, over all float32 kept weights: a 1-weight leaf's random mask may
  # keep nothing (the module's RNG state depends on which tests ran before).
  assert np.concatenate(rounded).any()


def test_int8_values_error_bound_per_output_channel(tmp_path):
  params, masks = model()
  export_compressed(tmp_path / "m", params, masks, values="int8")
  _, header, payload = parse(tmp_path / "m")
  loaded = load_compressed(tmp_path / "m")
  entries = {e["path"]: e for e in header["leaves"]}
  for path, w, m, got in aligned(params, masks, loaded):
    if m is None:
      assert entries[path]["encoding"] == "dense"
      continue
    w32 = np.asarray(jnp.asarray(w, jnp.float32))
    m = np.asarray(m)
    channels = w32.shape[-1]
    offset, length = entries[path]["sections"]["scales"]
    scale = np.frombuffer(payload, np.float32, channels, offset)
    assert length == 4 * channels
    # scale_c = max |kept w| in channel c / 127.
    expected = np.abs(np.where(m, w32, 0)).reshape(-1, channels).max(0) / np.float32(127)
    np.testing.assert_allclose(scale, expected, rtol=1e-6)
    assert entries[path]["sections"]["values"][1] == m.sum()  # 1 byte per kept weight
    got32 = np.asarray(got, np.float32)
    assert (got32[~m] == 0).all()
    err = np.abs(got32 - w32)
    # Half a quantization step, plus the float32 rounding of q * scale (and of the
    # leaf's own dtype on the way back).
    eps = float(jnp.finfo(np.asarray(w).dtype).eps)
    bound = np.broadcast_to(scale / 2, w32.shape) + np.abs(w32) * eps
    assert (err[m] <= bound[m]).all()


def test_int8_rejects_non_finite_kept_weights(tmp_path):
  w = jnp.ones((4, 4)).at[0, 0].set(jnp.inf)
  masks = {"w": jnp.ones((4, 4), bool)}
  with pytest.raises(ValueError, match="w has NaN or inf"):
    export_compressed(tmp_path / "m", {"w": w}, masks, values="int8")
  export_compressed(tmp_path / "m", {"w": w}, masks)  # float32 stores it as is.
  assert np.isinf(load_compressed(tmp_path / "m")["w"][0, 0])


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def exported(tmp_path):
  params, masks = model()
  path = tmp_path / "m.jxp"
  export_compressed(path, params, masks)
  return path, bytearray(path.read_bytes())


def test_corrupted_payload_is_detected(exported):
  path, data = exported
  data[-40] ^= 0x10  # A byte of the last payload section.
  path.write_bytes(bytes(data))
  with pytest.raises(CompressedFormatError, match="corrupted: SHA-256 checksum mismatch"):
    load_compressed(path)
  with pytest.raises(ValueError, match="checksum"):  # A ValueError as well.
    export_info(path)


def test_corrupted_header_is_detected(exported):
  path, data = exported
  data[40] ^= 0x01
  path.write_bytes(bytes(data))
  with pytest.raises(CompressedFormatError, match="checksum"):
    load_compressed(path)


@pytest.mark.parametrize("keep", [0, 5, 20, 100, -1])
def test_truncated_file(exported, keep):
  path, data = exported
  path.write_bytes(bytes(data[:keep] if keep >= 0 else data[:-1]))
  match = "not a jaxprune export" if 0 <= keep < len(MAGIC) else "truncated"
  with pytest.raises(CompressedFormatError, match=match):
    load_compressed(path)


def test_trailing_bytes(exported):
  path, data = exported
  path.write_bytes(bytes(data) + b"\0")
  with pytest.raises(CompressedFormatError, match="after the announced end"):
    load_compressed(path)


def test_wrong_magic(exported):
  path, data = exported
  path.write_bytes(b"NOTPRUNE" + bytes(data[8:]))
  with pytest.raises(CompressedFormatError, match=r"not a jaxprune export.*magic"):
    load_compressed(path)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0])
def test_unsupported_version(exported, version):
  path, data = exported
  data[8:12] = struct.pack("<I", version)
  path.write_bytes(bytes(data))
  match = f"format version {version}; this jaxprune reads version {FORMAT_VERSION}"
  with pytest.raises(CompressedFormatError, match=match):
    load_compressed(path)


def test_masks_must_match_params(tmp_path):
  params, masks = model()
  masks["fc1"]["kernel"] = masks["fc1"]["kernel"][:2]
  with pytest.raises(ValueError, match=r"fc1/kernel: mask shape \(2, 8\)"):
    export_compressed(tmp_path / "m", params, masks)
  assert not (tmp_path / "m").exists()


def test_bad_arguments(tmp_path):
  params, masks = model()
  with pytest.raises(ValueError, match="values must be"):
    export_compressed(tmp_path / "m", params, masks, values="float16")
  ints = {"w": jnp.ones((2, 2), jnp.int32)}
  with pytest.raises(ValueError, match="w has a mask but dtype int32"):
    export_compressed(tmp_path / "m", ints, {"w": jnp.ones((2, 2), bool)})
  with pytest.raises(TypeError, match="dict key"):
    export_compressed(tmp_path / "m", {("a", 1): jnp.ones(2)})
  assert list(tmp_path.iterdir()) == []  # Failed exports leave nothing behind.


# ----------------------------------------------------------------------------- sizes


def float32_model(shape=(64, 48), sparsity=0.75):
  params = {"fc1": {"kernel": normal(shape), "bias": normal(shape[-1:])},
            "fc2": {"kernel": normal(shape[::-1])}}
  return params, random_masks(params, jaxprune.select(params), sparsity)


def test_file_size_matches_the_analytic_size(tmp_path):
  params, masks = float32_model()
  info = export_compressed(tmp_path / "m", params, masks)
  assert info == export_info(tmp_path / "m")
  assert info.file_bytes == (tmp_path / "m").stat().st_size
  # float32 values of float32 leaves: the targeted section is exactly bitmask + values...
  report = jaxprune.sparsity_report(jaxprune.apply_masks(params, masks)).to_dict()
  assert info.targeted_bytes == info.analytic_targeted_bytes == report["targeted_compressed_bytes"]
  assert info.targeted_dense_bytes == report["targeted_dense_bytes"]
  assert info.dense_bytes == report["total_dense_bytes"]
  assert info.analytic_targeted_compression == pytest.approx(report["targeted_compression"])
  assert info.untargeted_bytes == 48 * 4
  # ...and the file adds only its header: prelude, JSON and checksum.
  assert info.file_bytes == info.header_bytes + info.targeted_bytes + info.untargeted_bytes
  assert info.header_bytes < 1024
  assert info.file_bytes < report["total_compressed_bytes"] + 1024
  assert info.kept == int(sum(m.sum() for m in jax.tree.leaves(masks)))


def test_int8_values_are_a_quarter_of_float32(tmp_path):
  params, masks = float32_model((256, 128), 0.5)
  f32 = export_compressed(tmp_path / "f32", params, masks, "float32")
  bf16 = export_compressed(tmp_path / "bf16", params, masks, "bfloat16")
  i8 = export_compressed(tmp_path / "i8", params, masks, "int8")
  mask_bytes = sum(-(-m.size // 8) for m in jax.tree.leaves(masks))
  scale_bytes = 4 * (128 + 256)  # one float32 per output channel of each kernel
  assert f32.targeted_bytes - mask_bytes == 4 * f32.kept
  assert bf16.targeted_bytes - mask_bytes == 2 * f32.kept
  assert i8.targeted_bytes - mask_bytes - scale_bytes == f32.kept
  assert f32.file_bytes > bf16.file_bytes > i8.file_bytes
  # At 50%, bitmask + 4 vs + 1 byte per kept weight: (1/8 + 2) / (1/8 + 1/2) = 3.4x
  # per weight, 3.28x with the int8 scales.
  assert f32.targeted_bytes / i8.targeted_bytes > 3.2
  assert i8.targeted_compression > 6 > f32.targeted_compression
