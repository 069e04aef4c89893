"""The package's version: one place, read by ``pyproject.toml`` and written into every dp entry."""

__version__ = "0.1.0"
