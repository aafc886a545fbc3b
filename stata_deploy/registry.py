"""A tiny name -> object registry (presets, attention kinds, scorers, exporters, runtimes)."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name`` (usable as a decorator). Duplicates are refused."""

        def _add(o: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = o
            return o

        return _add(obj) if obj is not None else _add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)


class PluginRegistry:
    """Exporters and runtimes: found through package entry points (group ``stata_deploy.exporters`` /
    ``stata_deploy.runtimes``), so the core names them without importing them. Loaded on first use."""

    def __init__(self, kind: str, group: str):
        self.kind, self.group = kind, group

    def _eps(self):
        from importlib.metadata import entry_points

        return {ep.name: ep for ep in entry_points(group=self.group)}

    def names(self) -> list[str]:
        return sorted(self._eps())

    def get(self, name: str):
        eps = self._eps()
        if name not in eps:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(eps)) or '(none installed)'}")
        try:
            return eps[name].load()
        except ImportError as e:
            raise ConfigError(f"{self.kind} {name!r} needs a package that is not installed: {e}") from None


EXPORTERS = PluginRegistry("exporter", "stata_deploy.exporters")
RUNTIMES = PluginRegistry("runtime", "stata_deploy.runtimes")
