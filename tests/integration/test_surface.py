"""The public surface: a short top level, one namespace per concern, each with an
`__all__` that resolves, and an API reference page for each."""

import importlib
import types
from pathlib import Path

import jaxprune

NAMESPACES = ("scores", "distributions", "schedules", "sparse_training", "oneshot",
              "structural", "training", "sharding", "export", "tree")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "api"


def test_the_top_level_is_short_and_lists_what_it_holds():
  names = [n for n in jaxprune.__all__ if n not in NAMESPACES]
  assert len(names) <= 30, names
  assert set(NAMESPACES) <= set(jaxprune.__all__)
  public = {n for n in dir(jaxprune) if not n.startswith("_")}
  assert public - set(jaxprune.__all__) == set(), "exported without __all__"


def test_every_namespace_exports_what_it_names_and_nothing_private():
  for name in NAMESPACES:
    module = importlib.import_module(f"jaxprune.{name}")
    for member in module.__all__:
      assert not member.startswith("_"), (name, member)
      value = getattr(module, member)  # resolves
      assert not isinstance(value, types.ModuleType), (name, member)
    loose = {n for n in vars(module) if not n.startswith("_")} - set(module.__all__)
    assert loose == set(), (name, loose)


def test_each_namespace_has_its_reference_page():
  for name in ("jaxprune", *NAMESPACES):
    page = DOCS / f"{name}.md"
    target = "jaxprune" if name == "jaxprune" else f"jaxprune.{name}"
    assert f"::: {target}\n" in page.read_text(), page
