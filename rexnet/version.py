"""rexnet's version (standard library only: everything imports it)."""

__version__ = "0.1.0"
