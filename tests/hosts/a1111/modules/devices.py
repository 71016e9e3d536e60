import contextlib

cpu = "cpu"


def autocast(disable=False):
    return contextlib.nullcontext()
