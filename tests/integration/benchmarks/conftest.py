"""A text of the benchmark tests' own (never ../shared): 20,000 words from a small list."""

import random

import pytest


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  rng = random.Random(0)
  words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
           "seven", "owls", "watch", "it"]
  path = tmp_path_factory.mktemp("bench_data") / "text.txt"
  path.write_text(" ".join(rng.choice(words) for _ in range(20_000)))
  return str(path)
