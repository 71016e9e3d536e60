"""Importing this module registers every built-in method."""
from . import basic, difference, spherical  # noqa: F401
