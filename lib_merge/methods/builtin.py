"""Importing this module registers every built-in method."""
from . import astolfo, basic, cosine, difference, nway, perpendicular, sce, spherical, task_methods  # noqa: F401
