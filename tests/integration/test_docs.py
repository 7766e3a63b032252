"""Every page of the documentation site runs: each page's ```python blocks are executed in
order, in one fresh namespace per page, in a temp dir (a guide builds on its earlier blocks,
as a reader does)."""

import os
import re
import shutil
import subprocess
import sys
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


def test_no_empty_link():
  # mkdocs' strict build does not warn about `[text]()`, which renders as a dead link.
  for page in [*pages(), DOCS.parent / "README.md"]:
    assert "]()" not in page.read_text(), page


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_runs(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": "docs"}
  text = page.read_text()
  for match in BLOCK.finditer(text):
    line = text[:match.start()].count("\n") + 2
    code = "\n" * (line - 1) + match.group(1)  # tracebacks name the page's own line
    exec(compile(code, str(page), "exec"), namespace)


def test_a_broken_link_fails_the_strict_build(tmp_path):
  # What `make docs` (and so `make test`) runs, on a copy of the site with one bad link:
  # it must fail and name the link (a quiet build would have counted no warning).
  root = DOCS.parent
  shutil.copytree(DOCS, tmp_path / "docs")
  with open(tmp_path / "docs" / "limits.md", "a") as f:
    f.write("\nSee [the missing page](missing-page.md).\n")
  config = (root / "mkdocs.yml").read_text().replace("paths: [.]", f"paths: [{root}]")
  config = config.replace('base_path: ["."]', f'base_path: ["{root}"]')
  (tmp_path / "mkdocs.yml").write_text(config)
  makefile = (root / "Makefile").read_text()
  command = re.search(r"^docs:.*\n\t(.*)$", makefile, flags=re.M).group(1)
  assert "--strict" in command and "--quiet" not in command and "-q " not in command
  proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                         str(tmp_path / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                        capture_output=True, text=True, env={**os.environ,
                                                             "NO_MKDOCS_2_WARNING": "1"})
  assert proc.returncode != 0
  assert "missing-page.md" in proc.stderr
