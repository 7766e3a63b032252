"""PNG plots of a prune-retrain run and of a shrunk model's recovery (matplotlib, headless)."""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # No display on CI machines or Colab's backend workers.
import matplotlib.pyplot as plt
import numpy as np


def plot_weight_histogram(before: Any, after: Any, name: str, path: str) -> str:
  """Histogram of log10 |w| of one layer before and after pruning (zeros counted apart)."""
  fig, ax = plt.subplots(figsize=(7, 4))
  for w, label, color in ((before, "dense", "tab:blue"), (after, "pruned", "tab:red")):
    a = np.abs(np.asarray(w, np.float32)).ravel()
    nz = a[a > 0]
    ax.hist(np.log10(nz), bins=80, alpha=0.55, color=color,
            label=f"{label}: {a.size - nz.size:,} zeros of {a.size:,}")
  ax.set_xlabel("log10 |w|  (nonzero weights)")
  ax.set_ylabel("count")
  ax.set_title(f"weight magnitudes of {name}")
  ax.legend()
  return _save(fig, path)


def plot_layer_sparsity(report: Any, path: str) -> str:
  """Bar chart of the sparsity of every targeted leaf of a `SparsityReport`."""
  rows = [r for r in report.leaves if r.targeted]
  fig, ax = plt.subplots(figsize=(8, max(3, 0.3 * len(rows) + 1)))
  names = [r.path.removesuffix("/kernel") for r in rows]
  ax.barh(names, [100 * r.sparsity for r in rows], color="tab:purple")
  ax.invert_yaxis()
  ax.set_xlabel("sparsity (%)")
  ax.set_xlim(0, 100)
  ax.set_title(f"per-layer sparsity (targeted: {report.targeted_sparsity:.1%})")
  return _save(fig, path)


def plot_perplexity(history: list, dense_perplexity: float, path: str) -> str:
  """Validation perplexity before/after each prune and after each retrain, by target."""
  fig, ax = plt.subplots(figsize=(7, 4))
  targets = [100 * r.target_sparsity for r in history]
  ax.plot(targets, [r.after_prune.metric for r in history], "v--", color="tab:red",
          label="after prune")
  ax.plot(targets, [r.after_retrain.metric for r in history], "o-", color="tab:green",
          label="after retrain")
  ax.axhline(dense_perplexity, color="gray", ls=":", label=f"dense {dense_perplexity:.2f}")
  ax.set_xlabel("target sparsity of pruned layers (%)")
  ax.set_ylabel("validation perplexity")
  ax.set_title("perplexity across the schedule")
  ax.legend()
  return _save(fig, path)


def plot_recovery(history: list, dense_perplexity: float, before_perplexity: float,
                  path: str) -> str:
  """Validation perplexity of a shrunk model while it recovers: `history` holds
  `(step, perplexity)` pairs; step 0 is the model right after shrinking."""
  fig, ax = plt.subplots(figsize=(7, 4))
  steps = [0] + [s for s, _ in history]
  values = [before_perplexity] + [p for _, p in history]
  ax.plot(steps, values, "o-", color="tab:green", label="shrunk model")
  ax.axhline(dense_perplexity, color="gray", ls=":", label=f"dense {dense_perplexity:.2f}")
  ax.set_xlabel("recovery step (distillation from the dense model)")
  ax.set_ylabel("validation perplexity")
  ax.set_title("perplexity during recovery")
  ax.legend()
  return _save(fig, path)


def plot_kept_widths(widths: dict, path: str) -> str:
  """Grouped bars: the kept share of each kind's units per block of the dense model
  (`widths[kind][block] = (kept, of)`; a dropped block keeps 0)."""
  kinds = list(widths)
  blocks = sorted({b for per in widths.values() for b in per})
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(blocks) + 2), 4))
  width = 0.8 / max(1, len(kinds))
  for k, kind in enumerate(kinds):
    shares = [100 * widths[kind][b][0] / widths[kind][b][1] if b in widths[kind] else 0.0
              for b in blocks]
    xs = np.arange(len(blocks)) + (k - (len(kinds) - 1) / 2) * width
    bars = ax.bar(xs, shares, width, label=kind)
    for x, b, bar in zip(xs, blocks, bars):
      kept, of = widths[kind].get(b, (0, 0))
      ax.annotate(f"{kept}/{of}", (x, bar.get_height()), ha="center", va="bottom",
                  fontsize=7)
  dropped = [b for b in blocks if all(per.get(b, (0, 1))[0] == 0 for per in widths.values())]
  ax.set_xticks(np.arange(len(blocks)),
                [f"block {b}" + (" (dropped)" if b in dropped else "") for b in blocks])
  ax.set_ylabel("units kept (%)")
  ax.set_ylim(0, 110)
  ax.set_title("per-layer kept widths")
  ax.legend()
  return _save(fig, path)


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
