"""The library's version, on the ground floor: run directories record it, and a resume checks it."""

__version__ = "0.1.0"
