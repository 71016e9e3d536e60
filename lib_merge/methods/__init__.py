"""Merge methods: ``get_method(name)``, ``all_methods()``, and the ``merge_method`` decorator."""
from .registry import KeyContext, MethodSpec, Param, all_methods, get_method, key_seed, merge_method

__all__ = ["KeyContext", "MethodSpec", "Param", "all_methods", "get_method", "key_seed", "merge_method"]
