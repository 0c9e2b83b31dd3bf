"""Experiments built on the public ssmix API (not installed with the library)."""
