"""Training objectives, chosen by name: a registry of :class:`ObjectiveSpec`.

Every module of this package that defines ``SPEC`` is registered when the package is imported,
so adding an objective is adding one module (plus its tests); ``register`` adds one from
elsewhere (a user's plug-in, a test). See ``spec.py`` for what a spec holds.
"""

from __future__ import annotations

import importlib
import pkgutil

from imat.errors import ConfigError
from imat.train_jax.objectives.spec import EMBEDDING_SOURCES, ObjectiveSpec

_REGISTRY: dict[str, ObjectiveSpec] = {}


def register(spec: ObjectiveSpec, *, replace: bool = False) -> ObjectiveSpec:
    """Register ``spec`` under ``spec.name``; a second spec of the same name needs ``replace``."""
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"objective {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_objective(name: str) -> ObjectiveSpec:
    """The spec registered under ``name``; ConfigError naming --objective otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown objective {name!r} (option --objective); "
                          f"choose one of {', '.join(objective_names())}") from None


def objective_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "spec":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        spec = getattr(module, "SPEC", None)
        if isinstance(spec, ObjectiveSpec):
            register(spec)


_discover()

__all__ = ["EMBEDDING_SOURCES", "ObjectiveSpec", "register", "unregister", "get_objective", "objective_names"]
