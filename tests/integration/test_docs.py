"""Every page of the documentation site runs: each page's ```python blocks are executed in
order, in one fresh namespace per page, in a temp dir (a guide builds on its earlier blocks,
as a reader does)."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
# Generated from the docstrings (their examples run in test_doctests) or included files.
GENERATED = {"api", "changelog.md"}
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.S | re.M)


def pages() -> list[Path]:
  return sorted(p for p in DOCS.rglob("*.md")
                if p.relative_to(DOCS).parts[0] not in GENERATED)


def test_the_guides_have_code():
  with_code = [p.relative_to(DOCS) for p in pages() if BLOCK.search(p.read_text())]
  assert len(with_code) >= 8, with_code


def test_no_other_code_fence_hides_python():
  # A block that runs must say `python`; anything else (bash, text) is shown, not run.
  for page in pages():
    for lang in re.findall(r"^```(\w*)", page.read_text(), flags=re.M):
      assert lang in ("python", "bash", "text", ""), (page, lang)


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_runs(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "docs"}
  text = page.read_text()
  for match in BLOCK.finditer(text):
    line = text[:match.start()].count("\n") + 2
    code = "\n" * (line - 1) + match.group(1)  # tracebacks name the page's own line
    exec(compile(code, str(page), "exec"), namespace)
