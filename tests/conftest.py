import os
import sys
from pathlib import Path

# The examples are scripts, not a package: make `import lm_model` work in tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

# tests/multidevice needs 8 host devices, a flag that must be set before jax starts:
# tests/test_multidevice.py runs it in a subprocess of its own.
collect_ignore = [] if os.environ.get("JAXPRUNE_MULTIDEVICE") == "1" else ["multidevice"]
