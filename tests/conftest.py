import os
import sys
from pathlib import Path

import jax
import pytest

# The examples are scripts, not a package: make `import lm_model` work in tests; and
# the tests' own helpers importable from their subfolders (`from test_resume_kill ...`).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# tests/multidevice needs 8 host devices, a flag that must be set before jax starts:
# tests/test_multidevice.py runs it in a subprocess of its own.
collect_ignore = [] if os.environ.get("JAXPRUNE_MULTIDEVICE") == "1" else ["multidevice"]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test file: two workers share the
  machine (`make test`), and a worker holding every file's executables grew past
  3.5 GB."""
  yield
  jax.clear_caches()
