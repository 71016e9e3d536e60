"""The method registry: pure tensor functions registered with typed, documented parameters.

A method receives fp32 tensors (one per model, in recipe order) and returns an fp32 tensor; it
does no I/O and no device moves and never loops over keys. The engine owns everything else:
reading, casting, chunking, threading. Parameters marked ``per_block`` (α, β) are resolved from
the block weights once per key before the call.
"""
from __future__ import annotations

import difflib
import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..errors import BadParameterError, UnknownMethodError


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # float | int | bool | str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    per_block: bool = False

    def coerce(self, value: Any, method: str) -> Any:
        try:
            if self.kind is bool:
                if isinstance(value, str):
                    low = value.strip().lower()
                    if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                        raise ValueError(value)
                    value = low in ("true", "1", "yes", "on")
                else:
                    value = bool(value)
            elif self.kind is int:
                as_float = float(value)
                if as_float != int(as_float):
                    raise ValueError(value)
                value = int(as_float)
            elif self.kind is float:
                value = float(value)
            else:
                value = str(value)
        except (TypeError, ValueError):
            raise BadParameterError(
                f"{method}: parameter {self.name}={value!r} is not a {self.kind.__name__}; {self.help}"
            ) from None
        if self.choices is not None and value not in self.choices:
            raise BadParameterError(
                f"{method}: parameter {self.name}={value!r}; choose one of {', '.join(map(str, self.choices))}"
            )
        if self.minimum is not None and value < self.minimum or self.maximum is not None and value > self.maximum:
            raise BadParameterError(
                f"{method}: parameter {self.name}={value!r} is outside [{self.minimum}, {self.maximum}]; {self.help}"
            )
        return value

    def describe_range(self) -> str:
        if self.choices is not None:
            return "|".join(map(str, self.choices))
        if self.minimum is None and self.maximum is None:
            return self.kind.__name__
        low = "-inf" if self.minimum is None else f"{self.minimum:g}"
        high = "inf" if self.maximum is None else f"{self.maximum:g}"
        return f"[{low}, {high}]"


@dataclass(frozen=True)
class KeyContext:
    """What a method may know about the key it is merging (for randomness and diagnostics)."""

    key: str
    block: str = "BASE"
    seed: int = 0

    def generator(self, salt: str = "", device: str | torch.device = "cpu") -> torch.Generator:
        """A generator seeded from hash(seed, key, salt): results never depend on thread order."""
        g = torch.Generator(device=device)
        g.manual_seed(key_seed(self.seed, self.key, salt))
        return g


def key_seed(seed: int, key: str, salt: str = "") -> int:
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[..., torch.Tensor]
    inputs: tuple[str, ...]
    params: tuple[Param, ...]
    help: str
    variadic: bool = False
    elementwise: bool = False
    random: bool = False
    reference: str = ""
    # Optional in-place kernel on the storage dtype that is bit-identical to the fp32 path
    # (checked by a test); lets the engine skip fp32 temporaries for the commonest merges.
    native: Callable[..., None] | None = field(default=None, compare=False)
    # Optional ``bounded(**params) -> bool``: True when, for these parameters, every output element
    # lies between the inputs' elements (a convex combination), so finite inputs of moderate size
    # cannot give a non-finite output. Lets the live merge check its inputs once per session
    # instead of every output it writes.
    bounded: Callable[..., bool] | None = field(default=None, compare=False)

    @property
    def min_models(self) -> int:
        return len(self.inputs)

    @property
    def max_models(self) -> int | None:
        return None if self.variadic else len(self.inputs)

    @property
    def block_params(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.per_block)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise BadParameterError(
            f"{self.name}: unknown parameter {name!r}; it takes {', '.join(p.name for p in self.params) or 'none'}"
        )

    def resolve_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults filled in, values coerced and range-checked; unknown names are an error."""
        for name in given:
            self.param(name)
        return {p.name: p.coerce(given[p.name], self.name) if p.name in given else p.default for p in self.params}

    def check_model_count(self, n: int) -> None:
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            want = f"at least {self.min_models}" if self.variadic else str(self.min_models)
            raise BadParameterError(
                f"method {self.name} takes {want} models ({', '.join(self.inputs)}{', …' if self.variadic else ''}), got {n}"
            )


_REGISTRY: dict[str, MethodSpec] = {}
_LOCK = threading.Lock()


def merge_method(
    name: str,
    *,
    inputs: tuple[str, ...],
    params: tuple[Param, ...] = (),
    variadic: bool = False,
    elementwise: bool = False,
    random: bool = False,
    reference: str = "",
    native: Callable[..., None] | None = None,
    bounded: Callable[..., bool] | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register ``fn(*tensors, ctx, **params)``; its docstring is the method's help text."""

    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        doc = (fn.__doc__ or "").strip()
        if not doc:
            raise TypeError(f"merge method {name} needs a docstring: it is the method's help")
        spec = MethodSpec(name, fn, inputs, params, doc, variadic, elementwise, random, reference, native, bounded)
        with _LOCK:
            if name in _REGISTRY:
                raise TypeError(f"merge method {name} registered twice")
            _REGISTRY[name] = spec
        return fn

    return register


def get_method(name: str) -> MethodSpec:
    _load_builtin_methods()
    spec = _REGISTRY.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(
            f"unknown merge method {name!r}{hint} Available: {', '.join(sorted(_REGISTRY))}"
        )
    return spec


def all_methods() -> list[MethodSpec]:
    _load_builtin_methods()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _load_builtin_methods() -> None:
    # Imported lazily so the registry module has no import cycle with the method modules.
    from . import builtin  # noqa: F401
