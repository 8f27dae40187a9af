"""The package version, in a module of its own so that no module below the package root imports the root."""

__version__ = "0.1.0"
