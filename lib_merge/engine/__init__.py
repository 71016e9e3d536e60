"""Moved from lib_merge/engine.py; split into modules in the next commit."""
from .run import *  # noqa: F401,F403
