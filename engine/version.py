"""The package's version (the store's manifest records it as `kindling_version`)."""

__version__ = "0.1.0"
