"""Toy guest images for `hv boot` (sources in guests/src, built by guests/build.py)."""
