"""The one registration mechanism of the package's registries (online strategies, engines): a
class decorator that files a class under its name and writes the name onto it."""

from __future__ import annotations

from collections.abc import Callable


def registrar(table: dict[str, type], kind: str, attr: str) -> Callable[[str], Callable[[type], type]]:
    """``@<returned>(name)`` files a class in ``table`` under ``name`` and sets ``cls.<attr> = name``;
    a second class under a taken name is refused (``kind`` names the registry in the message)."""

    def register(name: str) -> Callable[[type], type]:
        def decorate(cls: type) -> type:
            if table.get(name, cls) is not cls:
                raise ValueError(f"{kind} {name!r} is already registered ({table[name].__qualname__})")
            setattr(cls, attr, name)
            table[name] = cls
            return cls

        return decorate

    return register
