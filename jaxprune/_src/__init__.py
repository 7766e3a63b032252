"""jaxprune's implementation: private; the public names live in `jaxprune` and its
namespaces (`jaxprune.scores`, `jaxprune.structural`, ...)."""
