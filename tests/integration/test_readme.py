"""The README's framework snippets run as written (each in a fresh namespace, in a temp dir)."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- runs in tests/test_readme.py -->"


def snippets() -> list[str]:
  text = README.read_text()
  found = re.findall(re.escape(MARKER) + r"\n```python\n(.*?)```", text, flags=re.S)
  assert len(found) == text.count(MARKER)
  return found


def test_readme_has_a_snippet_per_framework():
  imports = snippets()
  assert len(imports) == 5
  assert "from flax import nnx" in imports[0]
  assert "import flax.linen as nn" in imports[1]
  assert "import equinox as eqx" in imports[2]


@pytest.mark.parametrize("index", range(5), ids=["nnx", "linen", "equinox", "plain", "shrink"])
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  code = snippets()[index]
  exec(compile(code, f"README.md snippet {index}", "exec"), {"__name__": "readme"})
  if "export_compressed" in code:
    assert os.path.exists(tmp_path / "mlp.jxp")
