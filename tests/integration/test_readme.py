"""The README's example runs as written (in a fresh namespace, in a temp dir), and the front
page stays a front page."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARKER = "<!-- runs in tests/integration/test_readme.py -->"


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  text = README.read_text()
  found = re.findall(re.escape(MARKER) + r"\n```python\n(.*?)```", text, flags=re.S)
  assert len(found) == 1 == text.count(MARKER) == text.count("```python")
  exec(compile(found[0], "README.md", "exec"), {"__name__": "readme"})
  assert "50.00%" in capsys.readouterr().out


def test_readme_is_a_front_page():
  text = README.read_text()
  assert len(text.encode()) <= 10_000
  assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "no dates on the front page"
  assert not re.search(r"\bissue \d+", text, flags=re.I), "no issue numbers on the front page"
  for link in re.findall(r"\]\(([^)#]+)\)", text):  # every local link resolves
    if not link.startswith("http"):
      assert (ROOT / link).exists(), link
