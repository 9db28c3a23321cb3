from contracts import offline as _offline  # noqa: F401  (must run before any model import)
