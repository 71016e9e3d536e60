"""The executor a command line names: ``local`` (this process's threads) or ``ray``. Choosing
``ray`` imports ``ray_executor`` — which imports Ray itself only when the executor is made, so
``import lib_merge`` and the WebUI never load Ray."""
from __future__ import annotations

from ..errors import BadParameterError
from .executor import Executor, LocalExecutor

EXECUTORS = ("local", "ray")


def make_executor(name: str | None, *, address: str | None = None, shard_bytes: int | None = None) -> Executor:
    if name in (None, "local"):
        if address:
            raise BadParameterError("--ray-address needs --executor ray")
        return LocalExecutor()
    if name == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(address=address, shard_bytes=shard_bytes)
    raise BadParameterError(f"--executor {name!r}: choose one of {', '.join(EXECUTORS)}")
