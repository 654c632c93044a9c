"""The layer library (``nnx.Linear``, ``nnx.Conv``, ...)."""
