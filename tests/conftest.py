import os
import sys
from pathlib import Path

import jax
import pytest

# The tests mirror the implementation (`tests/<area>/` for `jaxprune/_src/<area>/`);
# whole runs (zoo, faults, kill and resume, several devices and hosts, examples,
# benchmarks, README, doctests) are in `tests/integration/`.
#
# The examples are scripts, not a package: make `import lm_model` work in tests; and
# the tests' shared helpers importable from every folder (`numpy_references`, the
# `zoo` models, `test_resume_kill`'s subprocess tools).
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent / "examples"))
sys.path.insert(0, str(TESTS / "integration"))
sys.path.insert(0, str(TESTS))

# integration/multidevice needs 8 host devices, a flag that must be set before jax
# starts: integration/test_multidevice.py runs it in a subprocess of its own.
collect_ignore = ([] if os.environ.get("JAXPRUNE_MULTIDEVICE") == "1"
                  else ["integration/multidevice"])


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test file: two workers share the
  machine (`make test`), and a worker holding every file's executables grew past
  3.5 GB."""
  yield
  jax.clear_caches()
