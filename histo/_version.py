"""The version of lungmets: the one place it is written (read by pyproject.toml)."""

__version__ = "0.1.0"
