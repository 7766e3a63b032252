"""Export a pruned model as one compressed, self-describing file, and load it back.

Each targeted leaf (mask not None) is stored as a bitmask (1 bit per weight,
`np.packbits` of the row-major flattened mask, big-endian bits: `mask_tree.pack_bits`,
the order checkpoints use) plus its kept values only, in mask order: by default
at the leaf's own dtype (bitwise, and exactly the bytes `sparsity_report` counts),
or as float32, bfloat16, or int8 with one float32 scale per output channel: per
index over the leaf's output and stack axes read from the program with
`layouts=weight_layouts(apply_fn, params, x)`, else per index of the last axis (a
convention: the output axis of a Flax `(in, out)` kernel, the input axis of an
Equinox `(out, in)` weight or a gemma `(2, hidden, d)` gating kernel). Every other
leaf is stored dense at its own dtype.

File layout (all integers little-endian)::

  offset  size  field
  0       8     magic b"JXPRUNE1"
  8       4     format version, uint32: 1, or 2 where an int8 leaf's scales run
                over other axes than its last (`scale_axes` in the header)
  12      8     header length H in bytes, uint64
  20      8     payload length P in bytes, uint64
  28      H     header: UTF-8 JSON (tree skeleton, per-leaf dtype/shape/encoding/sections)
  28+H    P     payload: the raw byte sections, offsets relative to its start
  28+H+P  32    SHA-256 of bytes [0, 28+H+P)

Writes go to a temporary file renamed into place, so a crash never leaves a
partial file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._src.oneshot.layouts import Layouts
from jaxprune._src.tree.leaf_selection import path_string
from jaxprune._src.tree.mask_tree import (
  align_masks,
  canonical_path,
  is_none,
  pack_bits,
  slots,
  unflatten,
  unpack_bits,
)
from jaxprune._src.types import PyTree

# A `values` argument; None stores each leaf's kept values at the leaf's own dtype.
Values = Literal["float32", "bfloat16", "int8"]

MAGIC = b"JXPRUNE1"
# The newest version written. A file is written as version 1 unless some int8 leaf's
# scales run over other axes than its last: a version-1 reader knows no
# `scale_axes` and would decode those wrongly, so it is told to upgrade instead.
FORMAT_VERSION = 2
_READABLE = (1, 2)
_PRELUDE = struct.Struct("<8sIQQ")  # magic, version, header length, payload length
_DIGEST_BYTES = 32
_VALUE_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}
_VALUES = (None, *_VALUE_DTYPES, "int8")
_INT8_MAX = 127


class CompressedFormatError(ValueError):
  """A file that is not a readable jaxprune export: wrong magic, version, size, checksum."""


class ExportInfo(NamedTuple):
  """Real sizes of an export file next to the analytic ones of `sparsity_report`.

  `targeted_bytes` are the payload bytes of the targeted leaves (bitmasks, values,
  int8 scales); `analytic_targeted_bytes` is what `SparsityReport` counts for them:
  `ceil(size / 8)` bitmask bytes plus kept weights at the leaf's own dtype (equal
  to the report's figure when no kept weight is exactly zero). With the default
  `values=None` the file stores exactly that: `targeted_bytes ==
  analytic_targeted_bytes` and `file_bytes - header_bytes` is the report's
  `total_compressed_bytes` (when the report targets the masked leaves).
  """

  path: str
  values: str | None  # the `values` argument: None for each leaf's own dtype
  file_bytes: int  # the whole file on disk
  header_bytes: int  # prelude + JSON header + checksum: file_bytes - payload
  targeted_bytes: int
  untargeted_bytes: int  # dense leaves, at their own dtypes
  dense_bytes: int  # every leaf dense at its own dtype
  targeted_dense_bytes: int
  analytic_targeted_bytes: int
  kept: int  # kept weights over all targeted leaves
  targeted_params: int

  @property
  def compression(self) -> float:
    """Whole model: dense bytes / file bytes (header and checksum included)."""
    return _ratio(self.dense_bytes, self.file_bytes)

  @property
  def targeted_compression(self) -> float:
    """Targeted leaves: dense bytes / their payload bytes in the file."""
    return _ratio(self.targeted_dense_bytes, self.targeted_bytes)

  @property
  def analytic_targeted_compression(self) -> float:
    """`SparsityReport.targeted_compression` for the same masks (bitmask + values)."""
    return _ratio(self.targeted_dense_bytes, self.analytic_targeted_bytes)


def _ratio(a: float, b: float) -> float:
  return a / b if b else float("inf")


# ----------------------------------------------------------------------------- tree skeleton


def _json_key(key: Any, where: str) -> str | int:
  if isinstance(key, (str, int)) and not isinstance(key, bool):
    return key
  raise TypeError(f"cannot export dict key {key!r} at {where or '(root)'}: only str and int keys")


def _skeleton(node: Any, path: tuple, index_of: dict[str, int]) -> Any:
  """JSON description of the containers of `node`; leaves become their leaf index.

  dict/list/tuple/None are recorded as such (so plain trees round-trip to the
  same structure, empty containers included); any other pytree node (FrozenDict,
  NamedTuple, `nnx.State`, ...) becomes a dict keyed by its children's path
  components, or a list if they are all sequence indices.
  """
  ks = jax.tree_util
  if node is None:
    return {"t": "none"}
  if type(node) is dict:
    keys = [_json_key(k, path_string(path)) for k in node]
    children = [_skeleton(v, (*path, ks.DictKey(k)), index_of) for k, v in node.items()]
    return {"t": "dict", "k": keys, "v": children}
  if type(node) in (list, tuple):
    children = [_skeleton(v, (*path, ks.SequenceKey(i)), index_of) for i, v in enumerate(node)]
    return {"t": type(node).__name__, "v": children}
  if ks.treedef_is_leaf(jax.tree.structure(node)):
    return {"t": "leaf", "i": index_of[ks.keystr(path)]}
  # One level of a custom node: everything below the root counts as a leaf here.
  level = ks.tree_flatten_with_path(node, is_leaf=lambda y: y is not node)[0]
  keys = [k for (k,), _ in level]
  children = [_skeleton(v, (*path, k), index_of) for (k,), v in level]
  if all(isinstance(k, ks.SequenceKey) for k in keys):
    return {"t": "list", "v": children}
  names = [_json_key(k.key, path_string(path)) if isinstance(k, ks.DictKey)
           else path_string((k,)) for k in keys]
  return {"t": "dict", "k": names, "v": children}


def _rebuild(skeleton: Any, leaves: list[Any]) -> Any:
  kind = skeleton["t"]
  if kind == "leaf":
    return leaves[skeleton["i"]]
  if kind == "none":
    return None
  children = [_rebuild(c, leaves) for c in skeleton["v"]]
  if kind == "dict":
    return dict(zip(skeleton["k"], children))
  if kind == "list":
    return children
  if kind == "tuple":
    return tuple(children)
  raise CompressedFormatError(f"unknown container kind {kind!r} in the header")


# ----------------------------------------------------------------------------- encoding


def _host_array(x: Any, where: str) -> np.ndarray:
  a = np.asarray(jax.device_get(x))
  if not (a.dtype == np.bool_ or jnp.issubdtype(a.dtype, jnp.number)):
    raise TypeError(f"cannot export leaf {where} of dtype {a.dtype}: numeric arrays only")
  if a.dtype.byteorder == ">":  # The file is little-endian throughout.
    a = a.astype(a.dtype.newbyteorder("<"))
  return a  # `tobytes` and `reshape(-1)` read row-major whatever the memory layout.


def _dtype_name(dtype: np.dtype) -> str:
  return jnp.dtype(dtype).name


def int8_scale_axes(layouts: Mapping[str, Any] | None, path: str,
                    shape: tuple[int, ...]) -> tuple[int, ...]:
  """The axes int8 keeps one scale per index of, for leaf `path` of `shape`.

  With layouts: the leaf's stack and output axes (sorted), so a scale covers one
  output neuron of one layer and is the max over its input axes (a conv's input
  feature and spatial axes). Without: the last axis (the convention).

  Raises:
    ValueError: `layouts` without `path`, or using it as other than a product or
      conv weight (an embedding, a scale: no output neurons), with the reason.
  """
  if layouts is None:
    return (len(shape) - 1,) if shape else ()
  layout = layouts.get(path, layouts.get(canonical_path(path)))
  if layout is None:
    raise ValueError(f"export_compressed(values='int8', layouts=...): the layouts have no entry "
                     f"for {path}; build them from the same params")
  if layout.use not in ("dot_general", "conv"):
    raise ValueError(f"export_compressed(values='int8', layouts=...): the program uses {path} "
                     f"as {layout.use!r} ({layout.reason or layout.source}), not as the weight "
                     "of a product or conv: it has no output channels to scale by; export it "
                     "unmasked, or without layouts (scales per last axis)")
  return tuple(sorted(layout.stack + layout.outputs))


def _scale_index(shape: tuple[int, ...], scale_axes: tuple[int, ...],
                 mask: np.ndarray) -> np.ndarray:
  """For each kept weight (row-major, where `mask` of `shape`), the flat index of
  its scale in the row-major `(shape[a] for a in scale_axes)` array of scales."""
  count = math.prod(shape[a] for a in scale_axes)
  ids = np.arange(count).reshape([shape[a] if a in scale_axes else 1 for a in range(len(shape))])
  return np.broadcast_to(ids, shape)[mask.reshape(shape)]  # a view: no index per weight


def _int8_encode(x: np.ndarray, flat_mask: np.ndarray, where: str,
                 scale_axes: tuple[int, ...]):
  """Symmetric int8 of the kept weights of `x`: (q in mask order, scales).

  One scale per index over `scale_axes` (`int8_scale_axes`): `scale_c = max |w| /
  127` over the kept weights of channel `c` (all its other axes),
  `q = clip(round(w / scale_c), -127, 127)`. A channel with no kept weight, or only
  zeros, gets scale 0 and decodes to zeros. Scales are stored row-major over the
  scale axes, in increasing axis order.
  """
  dense = np.where(flat_mask, x.reshape(-1).astype(np.float32), np.float32(0))
  if not np.isfinite(dense).all():
    raise ValueError(f"leaf {where} has NaN or inf among its kept weights; cannot quantize to int8")
  reduced = tuple(a for a in range(x.ndim) if a not in scale_axes)
  amax = np.abs(dense.reshape(x.shape)).max(axis=reduced, initial=np.float32(0))
  scale = (amax / np.float32(_INT8_MAX)).astype(np.float32).reshape(-1)
  safe = np.where(scale > 0, scale, 1).astype(np.float64)
  channel = _scale_index(x.shape, scale_axes, flat_mask)
  # float64 division so the rounding is that of w / scale itself, not of a float32 quotient.
  q = np.rint(dense[flat_mask].astype(np.float64) / safe[channel])
  return np.clip(q, -_INT8_MAX, _INT8_MAX).astype(np.int8), scale


def _encode_leaf(x: np.ndarray, mask: np.ndarray | None, values: str | None, where: str,
                 layouts: Mapping[str, Any] | None = None):
  """(header entry without offsets, {section name: bytes}).

  A masked leaf's entry names how its kept values are stored: `values`, or with
  `values=None` its own dtype name (`"float16"`, `"bfloat16"`, ...), raw bytes;
  an int8 one whose scales do not run along its last axis also its `scale_axes`.
  """
  entry = {"path": where, "shape": list(x.shape), "dtype": _dtype_name(x.dtype)}
  if mask is None:
    return {**entry, "encoding": "dense"}, {"data": x.tobytes()}
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"leaf {where} has a mask but dtype {x.dtype}; only float leaves are masked")
  flat_mask = np.asarray(jax.device_get(mask)).reshape(-1)
  sections = {"mask": pack_bits(flat_mask).tobytes()}
  stored = entry["dtype"] if values is None else values
  entry = {**entry, "encoding": "bitmask", "values": stored, "kept": int(flat_mask.sum())}
  kept = x.reshape(-1)[flat_mask]
  if values is None:  # The leaf's own bytes: never larger than dense, bitwise on load.
    sections["values"] = kept.tobytes()
  elif values == "int8":
    scale_axes = int8_scale_axes(layouts, where, x.shape)
    if scale_axes != int8_scale_axes(None, where, x.shape):  # the last axis goes unsaid
      entry["scale_axes"] = list(scale_axes)
    q, scale = _int8_encode(x, flat_mask, where, scale_axes)
    sections["values"] = q.tobytes()
    sections["scales"] = scale.tobytes()
  else:
    # Through float32, exact for bf16/f16/f32 leaves, so bf16 values round only once.
    sections["values"] = kept.astype(np.float32).astype(_VALUE_DTYPES[values]).tobytes()
  return entry, sections


def _stored_scale_axes(entry: dict, shape: tuple[int, ...]) -> tuple[int, ...]:
  """An int8 entry's scale axes: as recorded, else (files before them) the last."""
  axes = entry.get("scale_axes", [len(shape) - 1] if shape else [])
  if not (isinstance(axes, list) and all(type(a) is int for a in axes)
          and axes == sorted(set(axes)) and all(0 <= a < len(shape) for a in axes)):
    raise CompressedFormatError(f"leaf {entry['path']}: scale_axes {axes!r} are not increasing "
                                f"axes of its shape {list(shape)}")
  return tuple(axes)


def _decode_leaf(entry: dict, payload: memoryview) -> tuple[np.ndarray, np.ndarray | None]:
  where = entry["path"]
  shape = tuple(entry["shape"])
  dtype = np.dtype(jnp.dtype(entry["dtype"]))
  size = int(np.prod(shape, dtype=np.int64))

  def section(name: str, dt: np.dtype, count: int) -> np.ndarray:
    offset, length = entry["sections"][name]
    if length != count * dt.itemsize or offset + length > len(payload):
      raise CompressedFormatError(
          f"leaf {where}: section {name!r} holds {length} bytes at offset {offset}, "
          f"expected {count} x {dt.itemsize} within a {len(payload)}-byte payload"
      )
    return np.frombuffer(payload, dt, count, offset)

  if entry["encoding"] == "dense":
    return section("data", dtype, size).reshape(shape).copy(), None
  if entry["encoding"] != "bitmask":
    raise CompressedFormatError(f"leaf {where}: unknown encoding {entry['encoding']!r}")
  bits = section("mask", np.dtype(np.uint8), -(-size // 8))
  flat_mask = unpack_bits(bits, size)
  kept = int(entry["kept"])
  if int(flat_mask.sum()) != kept:
    raise CompressedFormatError(f"leaf {where}: bitmask keeps {flat_mask.sum()}, header {kept}")
  if entry["values"] == "int8":
    scale_axes = _stored_scale_axes(entry, shape)
    q = section("values", np.dtype(np.int8), kept)
    scale = section("scales", np.dtype(np.float32), math.prod(shape[a] for a in scale_axes))
    kept_values = q.astype(np.float32) * scale[_scale_index(shape, scale_axes, flat_mask)]
  elif entry["values"] in _VALUE_DTYPES:
    kept_values = section("values", _VALUE_DTYPES[entry["values"]], kept)
  elif entry["values"] == entry["dtype"]:  # `values=None`: the leaf's own dtype.
    kept_values = section("values", dtype, kept)
  else:
    raise CompressedFormatError(f"leaf {where}: unknown value encoding {entry['values']!r}")
  flat = np.zeros(size, dtype)
  flat[flat_mask] = kept_values.astype(dtype)
  return flat.reshape(shape), flat_mask.reshape(shape)


# ----------------------------------------------------------------------------- file


def _write_atomic(path: str, chunks: list[bytes]) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".jxprune-", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      for chunk in chunks:
        f.write(chunk)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def export_compressed(
    path: str | os.PathLike,
    params: PyTree,
    masks: PyTree | None = None,
    values: Values | None = None,
    layouts: Layouts | None = None,
) -> ExportInfo:
  """Writes `apply_masks(params, masks)` to one compressed file at `path`.

  Targeted leaves (mask not None) cost `ceil(size / 8)` bitmask bytes plus `kept`
  values of `itemsize` bytes: by default the leaf's own dtype (2 for bf16/f16, 4
  for f32), or 4 (float32), 2 (bfloat16) or 1 (int8) as asked, int8 adding one
  float32 scale per output channel (see below). Untargeted leaves are stored dense
  at their own dtype. Pruned weights are not stored: they load as 0.

  With the default, a targeted leaf of `size` weights keeping `kept` costs
  `ceil(size / 8) + kept * itemsize` bytes, under its dense `size * itemsize`
  once `kept / size < 1 - 1 / (8 * itemsize)` (bf16/f16: 15/16; f32: 31/32).
  That is `sparsity_report`'s count: the payload equals the report's
  `total_compressed_bytes` (when no kept weight is exactly zero), so the file is
  that plus `header_bytes` (prelude, JSON, checksum), and its payload is smaller
  than the dense bytes wherever the report shows compression (`> 1x`).

  int8 is symmetric per output channel `c`: `scale_c = max |w|` over the kept
  weights of channel `c`, divided by 127; `q = clip(round(w / scale_c), -127,
  127)`; decoded as `q * scale_c`, so `|w - q * scale_c| <= scale_c / 2` (up to
  float32 rounding of the product). With `layouts` a channel is one output neuron
  of one layer: an index over the leaf's stack and output axes, the max taken over
  its input axes (`(2, hidden, d)` contracted on `d`: `2 * hidden` scales, each
  over `d`; `(heads, head_dim, d)`: `d` scales, each over heads and head_dim; a
  conv: one per output feature, over input features and space). Without layouts,
  by convention, a channel is an index of the last axis (right for Flax `(in,
  out)` kernels; the input axis of Equinox `(out, in)` weights). The header
  records an int8 leaf's `scale_axes` where they are not its last axis (the file
  is then format version 2), so `load_compressed` needs no layouts.

  The default round-trips every leaf bitwise (dtype kept); float32 values do so
  for float32 leaves. Values are cast back to the leaf's dtype on load.

  Args:
    path: the file to write (replaced atomically if it exists).
    params: the parameter pytree (dict/list/tuple containers and any JAX pytree
      node; numeric array or scalar leaves).
    masks: a mask tree of `params` (from `ranked_masks`, `nm_masks`, ...), or
      None to store every leaf dense.
    values: None (each leaf's own dtype), `"float32"`, `"bfloat16"` or `"int8"`:
      how kept values are stored.
    layouts: `weight_layouts(apply_fn, params, x)`: int8 scales per output
      channel of each masked leaf, read from the program; None: per last axis.
      Read by int8 only.

  Returns:
    An `ExportInfo` of the written file (see `export_info`).

  Raises:
    ValueError: unknown `values`; `masks` not matching params (see `check_masks`);
      a mask on a non-float leaf; NaN/inf kept weights with `values="int8"`; with
      int8 and `layouts`, a masked leaf they lack or that is not a product or conv
      weight (named with the program's reason).
    TypeError: a non-numeric leaf, or a dict key that is neither str nor int.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import jaxprune
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params))
    >>> info = jaxprune.export.export_compressed("model.jxp", params, masks)  # own dtypes: f32
    >>> report = jaxprune.sparsity_report(jaxprune.apply_masks(params, masks))
    >>> info.file_bytes - info.header_bytes == report.to_dict()["total_compressed_bytes"]
    True
    >>> masks = jaxprune.nm_masks(params, 2, 4)
    >>> info = jaxprune.export.export_compressed("model.jxp", params, masks, values="int8")
    >>> info.file_bytes, round(info.targeted_compression, 2)   # bytes; x smaller on targets
    (827, 3.56)
    >>> params2 = jaxprune.export.load_compressed("model.jxp")
    >>> float(jnp.mean(params2["fc1"]["kernel"] == 0))           # 2 of every 4 zeroed
    0.5

    Scales per output neuron of an Equinox-style `(out, in)` weight, from its layout
    (the small neuron keeps its own scale, not the large one's):

    >>> from jaxprune.tree import weight_layouts
    >>> w = {"w": jnp.array([[1.0, -2.0], [0.03, 0.01]])}      # rows: output neurons
    >>> layouts = weight_layouts(lambda p, x: x @ p["w"].T, w, jnp.ones((1, 2)))
    >>> m = {"w": jnp.ones((2, 2), bool)}
    >>> _ = jaxprune.export.export_compressed("w.jxp", w, m, values="int8", layouts=layouts)
    >>> np.asarray(jaxprune.export.load_compressed("w.jxp")["w"][1], np.float64).round(3).tolist()
    [0.03, 0.01]
    >>> _ = jaxprune.export.export_compressed("w.jxp", w, m, values="int8")   # per last axis
    >>> np.asarray(jaxprune.export.load_compressed("w.jxp")["w"][1], np.float64).round(3).tolist()
    [0.031, 0.016]
  """
  if layouts is not None and not isinstance(layouts, Layouts):
    raise ValueError("layouts must be a jaxprune.tree.Layouts (weight_layouts(apply_fn, params, "
                     f"x)) or None, got {type(layouts).__name__}")
  if values not in _VALUES:
    raise ValueError("values must be None (each leaf's own dtype), 'float32', 'bfloat16' "
                     f"or 'int8', got {values!r}")
  path = os.fspath(path)
  # None counts as a leaf here, as in mask trees, so that params and masks line up.
  with_path = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_none)[0]
  mask_leaves = [None] * len(with_path) if masks is None else align_masks(masks, params)
  leaves = [(p, x, mask) for (p, x), mask in zip(with_path, mask_leaves) if x is not None]
  index_of = {jax.tree_util.keystr(p): i for i, (p, _, _) in enumerate(leaves)}
  skeleton = _skeleton(params, (), index_of)

  entries, payload, offset = [], [], 0
  for p, x, mask in leaves:
    where = path_string(p)
    entry, sections = _encode_leaf(_host_array(x, where), mask, values, where, layouts)
    entry["sections"] = {}
    for name, data in sections.items():
      entry["sections"][name] = [offset, len(data)]
      payload.append(data)
      offset += len(data)
    entries.append(entry)

  header = json.dumps(
      {"values": values, "tree": skeleton, "leaves": entries}, separators=(",", ":")
  ).encode()
  prelude = _PRELUDE.pack(MAGIC, _version_of(entries), len(header), offset)
  digest = hashlib.sha256(prelude)
  digest.update(header)
  for chunk in payload:
    digest.update(chunk)
  _write_atomic(path, [prelude, header, *payload, digest.digest()])
  return _info(path, json.loads(header), os.path.getsize(path), offset)


def _version_of(entries: list[dict]) -> int:
  """1 unless an int8 leaf's scales run over other axes than its last (version 2)."""
  def last_axis(entry: dict) -> list[int]:
    return [len(entry["shape"]) - 1] if entry["shape"] else []
  moved = any(e.get("scale_axes", last_axis(e)) != last_axis(e) for e in entries)
  return 2 if moved else 1


def _read(path: str) -> tuple[dict, memoryview]:
  """Checks a file and returns its parsed header and payload."""
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
    raise CompressedFormatError(
        f"{path} is not a jaxprune export: it does not start with the magic bytes {MAGIC!r}"
    )
  if len(data) < _PRELUDE.size:
    raise CompressedFormatError(f"{path} is truncated: {len(data)} bytes, shorter than its prelude")
  _, version, header_len, payload_len = _PRELUDE.unpack_from(data)
  if version not in _READABLE:
    raise CompressedFormatError(
        f"{path} has format version {version}; this jaxprune reads version {FORMAT_VERSION} "
        f"and earlier ({', '.join(map(str, _READABLE))})"
        + (" (upgrade jaxprune to read it)" if version > FORMAT_VERSION else "")
    )
  body_end = _PRELUDE.size + header_len + payload_len
  expected = body_end + _DIGEST_BYTES
  if len(data) < expected:
    raise CompressedFormatError(
        f"{path} is truncated: its prelude announces {expected} bytes, the file has {len(data)}"
    )
  if len(data) > expected:
    raise CompressedFormatError(
        f"{path} is corrupted: {len(data) - expected} bytes after the announced end ({expected})"
    )
  view = memoryview(data)
  if hashlib.sha256(view[:body_end]).digest() != data[body_end:]:
    raise CompressedFormatError(f"{path} is corrupted: SHA-256 checksum mismatch")
  header = json.loads(view[_PRELUDE.size : _PRELUDE.size + header_len].tobytes())
  return header, view[_PRELUDE.size + header_len : body_end]


def load_compressed(
    path: str | os.PathLike, *, like: PyTree | None = None, with_masks: bool = False
) -> PyTree | tuple[PyTree, PyTree]:
  """Reads an `export_compressed` file back into dense params.

  Without `like`, containers come back as plain dicts/lists/tuples: dict, list and
  tuple params round-trip to the same structure; other pytree nodes (FrozenDict,
  NamedTuple, `nnx.State`, Equinox modules) come back as nested dicts keyed by
  their path components, so every leaf keeps its path string (`fc1/kernel`,
  `fc1/kernel/value`), and leaves are NumPy arrays.

  With `like` (the params tree of the model to load into, e.g. the tree that was
  exported, or `jax.eval_shape` of it), the result has `like`'s structure and
  containers, leaves matched by path (an nnx trailing `/value` may differ) and
  checked for shape and dtype, as `jax.Array`s on the shardings of `like`'s leaves.
  That is the way back into a running model:

  * Flax NNX: `nnx.update(model, load_compressed(f, like=nnx.state(model, nnx.Param)))`;
  * Flax Linen: `variables = {"params": load_compressed(f, like=variables["params"])}`;
  * Equinox: `params, static = eqx.partition(model, eqx.is_array)`, then
    `model = eqx.combine(load_compressed(f, like=params), static)`.

  Args:
    path: a file written by `export_compressed`.
    like: a params tree to lay the result out like, or None.
    with_masks: also return the mask tree (bool arrays for the bitmask leaves,
      None elsewhere), e.g. to keep fine-tuning with `pruned`.

  Returns:
    `params`, or `(params, masks)` with `with_masks=True`.

  Raises:
    CompressedFormatError (a ValueError): wrong magic bytes, unsupported format
      version, truncated file, or checksum mismatch (corruption).
    ValueError: with `like`, a leaf of `like` missing from the file, a file leaf
      missing from `like`, or a shape/dtype mismatch, naming the path.
  """
  header, payload = _read(os.fspath(path))
  decoded = [_decode_leaf(entry, payload) for entry in header["leaves"]]
  if like is not None:
    return _laid_out_like(like, header["leaves"], decoded, os.fspath(path), with_masks)
  params = _rebuild(header["tree"], [x for x, _ in decoded])
  if not with_masks:
    return params
  return params, _rebuild(header["tree"], [m for _, m in decoded])


def _laid_out_like(like: PyTree, entries: list[dict], decoded: list, path: str,
                   with_masks: bool) -> PyTree | tuple[PyTree, PyTree]:
  in_file = {canonical_path(e["path"]): i for i, e in enumerate(entries)}
  theirs = slots(like)
  values, masks, used = [], [], set()
  for where, ref in zip(theirs.paths, theirs.leaves):
    if ref is None:
      values.append(None)
      masks.append(None)
      continue
    i = in_file.get(canonical_path(where))
    if i is None:
      raise ValueError(f"load_compressed(like=...): {where} of `like` is not in {path}")
    x, mask = decoded[i]
    if not hasattr(ref, "dtype"):
      raise ValueError(f"load_compressed(like=...): {where} of `like` is {ref!r}, not an array")
    if tuple(x.shape) != tuple(np.shape(ref)) or x.dtype != np.dtype(ref.dtype):
      raise ValueError(
          f"load_compressed(like=...): {where} is {x.dtype}{list(x.shape)} in {path} "
          f"but {np.dtype(ref.dtype)}{list(np.shape(ref))} in `like`"
      )
    used.add(i)
    sharding = getattr(ref, "sharding", None)  # jax.Array or jax.ShapeDtypeStruct
    values.append(jax.device_put(x, sharding))
    masks.append(None if mask is None else jax.device_put(mask, sharding))
  extra = [entries[i]["path"] for i in range(len(entries)) if i not in used]
  if extra:
    raise ValueError(f"load_compressed(like=...): {path} holds {extra[0]}, which `like` lacks")
  params = unflatten(like, values)
  return (params, unflatten(like, masks)) if with_masks else params


def _info(path: str, header: dict, file_bytes: int, payload_bytes: int) -> ExportInfo:
  targeted = untargeted = dense = targeted_dense = analytic = kept = targeted_params = 0
  for entry in header["leaves"]:
    size = int(np.prod(entry["shape"], dtype=np.int64))
    itemsize = jnp.dtype(entry["dtype"]).itemsize
    stored = sum(length for _, length in entry["sections"].values())
    dense += size * itemsize
    if entry["encoding"] == "dense":
      untargeted += stored
      continue
    targeted += stored
    targeted_dense += size * itemsize
    targeted_params += size
    kept += entry["kept"]
    analytic += -(-size // 8) + entry["kept"] * itemsize
  return ExportInfo(
      path=path,
      values=header["values"],
      file_bytes=file_bytes,
      header_bytes=file_bytes - payload_bytes,
      targeted_bytes=targeted,
      untargeted_bytes=untargeted,
      dense_bytes=dense,
      targeted_dense_bytes=targeted_dense,
      analytic_targeted_bytes=analytic,
      kept=kept,
      targeted_params=targeted_params,
  )


def export_info(path: str | os.PathLike) -> ExportInfo:
  """Sizes of an existing export file (checked as by `load_compressed`), nothing decoded.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import jaxprune
    >>> k1, k2 = jax.random.split(jax.random.key(0))
    >>> params = {"fc1": {"kernel": 0.3 * jax.random.normal(k1, (8, 8)), "bias": jnp.ones(8)},
    ...           "fc2": {"kernel": 0.3 * jax.random.normal(k2, (8, 4))}}
    >>> masks = jaxprune.ranked_masks(params, 0.5, jaxprune.select(params))
    >>> _ = jaxprune.export.export_compressed("model.jxp", params, masks, values="int8")
    >>> info = jaxprune.export.export_info("model.jxp")
    >>> print(f"{info.compression:.2f}x on disk, "          # a tiny model: the header dominates
    ...       f"{info.targeted_compression:.2f}x on targeted leaves "
    ...       f"(analytic {info.analytic_targeted_compression:.2f}x)")
    0.50x on disk, 3.56x on targeted leaves (analytic 1.88x)
  """
  path = os.fspath(path)
  header, payload = _read(path)
  return _info(path, header, os.path.getsize(path), len(payload))
