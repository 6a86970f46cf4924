"""saelib's version, recorded in every SAE it writes."""

__version__ = "0.1.0"
