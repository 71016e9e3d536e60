# Follows modules/devices.py of A1111 v1.10.1 (tag v1.10.1).
import contextlib

cpu = "cpu"


def autocast(disable=False):
    return contextlib.nullcontext()
