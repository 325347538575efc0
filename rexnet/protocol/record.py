"""Record: a frozen dataclass for the launcher's start-up path, without dataclasses.

`import dataclasses` imports re, inspect, enum and collections (some 15 ms cold), which
the thin launcher (rexnet.cli.launcher) must not pay. A subclass of Record declares its
fields with annotations and defaults, as a dataclass does; type checkers see it as a
frozen dataclass (dataclass_transform), and at run time Record gives it a keyword
``__init__``, equality, hashing, a repr and ``replace``. Fields are read from the
annotations in order (base classes first); ``ClassVar`` annotations are no fields.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar, Self, dataclass_transform
else:
    def dataclass_transform(**_: object) -> object:
        return lambda cls: cls


@dataclass_transform(frozen_default=True, kw_only_default=False)
class Record:
    """A frozen record; see the module's docstring."""

    __fields__: ClassVar[tuple[str, ...]] = ()
    __fieldset__: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            for name, annotation in vars(klass).get("__annotations__", {}).items():
                if name not in names and not str(annotation).startswith("ClassVar"):
                    names.append(name)
        cls.__fields__ = tuple(names)
        cls.__fieldset__ = frozenset(names)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = self.__fields__
        values = kwargs  # (a dict of this call's own)
        if args:
            if len(args) > len(fields):
                raise TypeError(f"{type(self).__name__} takes at most {len(fields)} arguments")
            values = dict(zip(fields, args, strict=False))
            for name, value in kwargs.items():
                if name in values:
                    raise TypeError(f"{type(self).__name__}: unexpected or repeated "
                                    f"argument {name!r}")
                values[name] = value
        if not self.__fieldset__.issuperset(values):
            name = next(name for name in values if name not in self.__fieldset__)
            raise TypeError(f"{type(self).__name__}: unexpected or repeated argument "
                            f"{name!r}")
        if len(values) < len(fields):
            for name in fields:
                if name not in values:
                    if not hasattr(type(self), name):
                        raise TypeError(f"{type(self).__name__}: missing argument {name!r}")
                    values[name] = getattr(type(self), name)
        self.__dict__.update(values)  # (past the frozen __setattr__)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot delete {name!r}")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__fields__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__fields__)
        return f"{type(self).__name__}({inner})"

    def replace(self, **changes: Any) -> Self:
        """A copy with CHANGES (as dataclasses.replace)."""
        return type(self)(**{**{name: getattr(self, name) for name in self.__fields__},
                             **changes})
