"""The three doors users come through: the training script, the optax chain, the notebook.

Each runs end to end on CPU with a tiny configuration on the embedded corpus (no download).
"""

import json
import math
import os
import subprocess
import sys

import nbformat
import optax_chain
import pytest
import shrink_lm
import train_lm
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--d-model", "32", "--layers", "1", "--context", "32", "--batch-size", "4",
        "--max-bytes", "200000", "--eval-batches", "2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_train_lm_help_lists_the_flags(capsys):
  with pytest.raises(SystemExit) as exit_info:
    train_lm.parse_args(["--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for flag in ("--data", "--steps", "--retrain-steps", "--final-sparsity", "--iterations",
               "--schedule", "--scope", "--moe", "--out", "--seed", "--resume"):
    assert flag in text


def test_train_lm_runs_prunes_plots_and_resumes(tmp_path, capsys):
  out = str(tmp_path / "run")
  argv = TINY + ["--steps", "30", "--retrain-steps", "6", "--iterations", "2",
                 "--final-sparsity", "0.5", "--out", out]
  results = train_lm.main(argv)
  printed = capsys.readouterr().out
  assert "perplexity degradation" in printed and "sample from the pruned model" in printed
  assert "equal-budget dense baseline (6 more dense steps)" in printed
  baseline = results["baseline_perplexity"]
  assert math.isfinite(baseline) and baseline != results["dense_perplexity"]
  assert results["degradation_vs_baseline"] == pytest.approx(
      results["final_perplexity"] / baseline - 1)
  assert [round(r["target_sparsity"], 4) for r in results["history"]] == [0.2, 0.5]
  assert abs(results["achieved_sparsity"] - 0.5) < 1e-3
  assert results["overall_sparsity"] < results["achieved_sparsity"]
  for path in results["plots"]:
    with open(path, "rb") as f:
      assert f.read(8) == PNG_MAGIC
  with open(os.path.join(out, "results.json")) as f:
    assert json.load(f)["final_perplexity"] == pytest.approx(results["final_perplexity"])

  # A resumed run finds the dense params and the finished schedule: same answer.
  again = train_lm.main(argv + ["--resume", "--no-plots"])
  assert "resuming: dense params" in capsys.readouterr().out
  assert again["final_perplexity"] == results["final_perplexity"]


def test_train_lm_moe_and_global_scope(tmp_path):
  results = train_lm.main(TINY + ["--moe", "--scope", "global", "--steps", "10",
                                  "--retrain-steps", "3", "--schedule", "oneshot",
                                  "--final-sparsity", "0.6", "--no-plots",
                                  "--out", str(tmp_path / "moe")])
  expert = [r for r in results["report"]["leaves"] if r["path"].endswith("mlp/fc1")]
  assert expert and expert[0]["shape"] == [4, 32, 128]
  n = results["report"]["targeted_params"]
  assert results["achieved_sparsity"] == pytest.approx(round(0.6 * n) / n, abs=1e-12)


def test_train_lm_refuses_to_overwrite_without_resume(tmp_path):
  out = str(tmp_path / "run")
  argv = TINY + ["--steps", "5", "--retrain-steps", "1", "--iterations", "1", "--no-plots",
                 "--out", out]
  train_lm.main(argv)
  with pytest.raises(SystemExit, match="--resume"):
    train_lm.main(argv)


def test_optax_chain_prunes_gradually_in_graph(capsys):
  result = optax_chain.main(TINY + ["--steps", "60", "--log-every", "20", "--update-every", "5",
                                    "--final-sparsity", "0.7"])
  log = result["log"]
  assert result["compilations"] == 1
  assert log[0]["mask_sparsity"] < log[-1]["mask_sparsity"]
  assert abs(log[-1]["mask_sparsity"] - 0.7) < 2e-3
  # Held masks mean the weights really are zero, not just masked in the report.
  assert abs(log[-1]["weight_sparsity"] - log[-1]["mask_sparsity"]) < 1e-6
  assert "validation perplexity" in capsys.readouterr().out


def test_colab_notebook_runs_end_to_end_on_cpu(tmp_path):
  nb = nbformat.read(os.path.join(ROOT, "examples", "colab_tpu.ipynb"), as_version=4)
  tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1
  tagged[0].source += (
      "\nD_MODEL, LAYERS, CONTEXT, BATCH = 32, 1, 32, 4\nDENSE_STEPS, RETRAIN_STEPS = 20, 4\n"
      f"ITERATIONS, EVAL_BATCHES, MAX_BYTES = 2, 2, 200_000\nOUT = {str(tmp_path)!r}\n"
  )
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
  outputs = "\n".join(
      o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
  )
  assert "device count" in outputs
  assert "after retrain" in outputs and "dense perplexity" in outputs
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 3
  assert sorted(os.listdir(tmp_path)) == ["layer_sparsity.png", "perplexity.png",
                                          "weights_histogram.png"]


def test_train_lm_exports_quantizes_and_distills(tmp_path, capsys):
  results = train_lm.main(TINY + ["--steps", "10", "--retrain-steps", "3", "--iterations", "1",
                                  "--final-sparsity", "0.75", "--no-plots", "--distill", "0.5",
                                  "--export", "--quantize", "int8", "--out", str(tmp_path)])
  rows = {r["model"]: r for r in results["exported"]}
  assert set(rows) == {"dense", "pruned", "pruned + int8"}
  assert rows["pruned + int8"]["file_bytes"] < rows["pruned"]["file_bytes"]
  assert rows["pruned"]["file_bytes"] < rows["dense"]["file_bytes"]
  for r in rows.values():
    assert os.path.getsize(r["path"]) == r["file_bytes"]
  # The reloaded pruned file evaluates exactly like the in-memory pruned model.
  assert rows["pruned"]["perplexity"] == pytest.approx(results["final_perplexity"], rel=1e-5)
  assert "end to end: export -> load -> evaluate" in capsys.readouterr().out


def test_shrink_lm_help_lists_the_flags(capsys):
  with pytest.raises(SystemExit) as exit_info:
    shrink_lm.parse_args(["--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for flag in ("--params", "--importance", "--keep", "--drop-layers", "--round-to", "--scope",
               "--recovery-steps", "--distill", "--out", "--resume"):
    assert flag in text
  assert shrink_lm.parse_keep("mlp_hidden=0.5,heads=0.75") == {"mlp_hidden": 0.5, "heads": 0.75}
  assert shrink_lm.parse_keep("none") == {}


def run_shrink_lm(*argv: str) -> tuple[str, dict]:
  """`examples/shrink_lm.py` in a process of its own: (stdout, results.json)."""
  out = argv[argv.index("--out") + 1]
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "shrink_lm.py"), *argv],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"shrink_lm.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  with open(os.path.join(out, "results.json")) as f:
    return proc.stdout, json.load(f)


def test_shrink_lm_shrinks_distills_and_reloads(tmp_path):
  tiny = TINY[:2] + ["--layers", "2"] + TINY[4:]  # two blocks: one to drop
  out = str(tmp_path / "run")
  printed, results = run_shrink_lm(*tiny, "--steps", "40", "--eval-every", "5",
                                   "--drop-layers", "1", "--timing-rounds", "2", "--out", out)
  assert "channel groups of the 1-block model:" in printed
  assert "mlp_hidden size 128" in printed and "heads size 4" in printed
  assert "Block Influence per block" in printed
  assert "| shrunk, after recovery (10 steps) |" in printed
  params, ppl = results["params"], results["perplexity"]
  assert params["shrunk"] < params["dense"]
  assert all(math.isfinite(v) and v > 1 for v in ppl.values())
  # Recovery (a quarter of the 40 dense steps) lowers the shrunk model's validation loss.
  assert ppl["after_recovery"] < ppl["before_recovery"]
  history = results["recovery_history"]
  assert [h["step"] for h in history] == [5, 10]
  assert history[-1]["perplexity"] == ppl["after_recovery"]
  assert results["args"]["recovery_steps"] == 10
  # The block of higher Block Influence stays; per kept block 3 of 4 heads, half the MLP.
  influence = {int(b): v for b, v in results["block_influence"].items()}
  assert results["kept_blocks"] == [max(influence, key=influence.get)]
  kept = results["kept_blocks"][0]
  assert results["widths"]["heads"][str(kept)] == [3, 4]
  assert results["widths"]["mlp_hidden"][str(kept)] == [64, 128]
  assert results["widths"]["heads"][str(1 - kept)] == [0, 4]
  assert results["forward_speedup"] > 0 and all(v > 0 for v in results["forward_ms"].values())
  assert sorted(os.listdir(out)) == ["dense", "kept_widths.png", "recover", "recovery.png",
                                     "results.json"]
  for path in results["plots"]:
    with open(path, "rb") as f:
      assert f.read(8) == PNG_MAGIC

  # The dense params it saved, reloaded, shrunk along the residual stream by Taylor.
  other = str(tmp_path / "residual")
  printed, again = run_shrink_lm(*tiny, "--steps", "40", "--params", os.path.join(out, "dense"),
                                 "--importance", "taylor", "--keep", "residual=0.75",
                                 "--timing-rounds", "1", "--no-plots", "--out", other)
  assert again["perplexity"]["dense"] == ppl["dense"]
  assert again["widths"]["residual"] == {"0": [24, 32], "1": [24, 32]}
  assert again["params"]["shrunk"] < again["params"]["dense"] == params["dense"]
  assert again["perplexity"]["after_recovery"] < again["perplexity"]["before_recovery"]
