"""Moved from lib_merge/soup.py; split into modules in the next commit."""
from .pot import Ingredient, Pot  # noqa: F401
