"""Every `>>>` example in jaxprune's docstrings runs as a doctest, in a temp dir.

Each docstring's example is self-contained, as optax's are: it runs with empty globals,
so it makes its own imports and data (nothing is injected by this test).
"""

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import jaxprune

# Every module, the private implementation's included (its docstrings are the API
# reference's text).
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(jaxprune.__path__, "jaxprune.") if not m.ispkg
)
OPTIONS = doctest.ELLIPSIS


def find(name: str, globs: dict) -> list[doctest.DocTest]:
  module = importlib.import_module(name)
  tests = doctest.DocTestFinder(exclude_empty=True).find(module, name, globs=globs)
  return [t for t in tests if t.examples]


def test_every_example_is_found():
  # A `>>>` the finder misses (a docstring it does not reach) would silently never run.
  total = 0
  for name in MODULES:
    source = Path(importlib.import_module(name).__file__).read_text()
    found = sum(len(t.examples) for t in find(name, {}))
    assert found == len(re.findall(r"^\s*>>>", source, flags=re.M)), name
    total += found
  assert total >= 30


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  runner = doctest.DocTestRunner(optionflags=OPTIONS)
  report = []
  for test in find(name, {}):
    # `find` copies the globals per docstring, so each example starts from nothing.
    runner.run(test, out=report.append)
  result = runner.summarize(verbose=False)
  assert result.failed == 0, "".join(report)
