"""The package says what it is: the license it declares ships as a file, and every
subpackage of the implementation ships in the wheel."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pyproject() -> str:
  with open(os.path.join(ROOT, "pyproject.toml")) as f:
    return f.read()


def test_declared_license_ships_as_a_file():
  text = _pyproject()
  assert re.search(r'^license = "Apache-2\.0"$', text, re.M)
  files = re.search(r"^license-files = \[(.*)\]$", text, re.M)
  assert files and '"LICENSE"' in files.group(1)
  with open(os.path.join(ROOT, "LICENSE")) as f:
    license_text = f.read()
  assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
  assert "END OF TERMS AND CONDITIONS" in license_text


def test_every_subpackage_is_packaged():
  import setuptools

  found = re.search(r"^\[tool\.setuptools\.packages\.find\]\ninclude = \[(.*)\]$", _pyproject(),
                    re.M)
  assert found, "pyproject must find the packages (jaxprune._src and its areas included)"
  include = re.findall(r'"([^"]+)"', found.group(1))
  packaged = set(setuptools.find_packages(ROOT, include=include))
  on_disk = {os.path.relpath(d, ROOT).replace(os.sep, ".")
             for d, _, files in os.walk(os.path.join(ROOT, "jaxprune")) if "__init__.py" in files}
  assert "jaxprune._src.structural" in on_disk and packaged == on_disk
