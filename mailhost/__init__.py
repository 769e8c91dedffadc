"""mailhost: a complete mail host for a small organisation, on Twisted."""

__version__ = "0.1.0"
