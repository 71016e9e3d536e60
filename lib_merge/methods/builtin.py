"""Importing this module registers every built-in method."""
from . import astolfo, basic, difference, nway, perpendicular, sce, spherical, task_methods  # noqa: F401
