"""The base of the public handles (Network, Endpoint, Sandbox).

A handle is a typed view over one stored record plus the controller that owns its
lifecycle; two handles are equal when they name the same object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from .controller import NetworkController


class _Record(Protocol):
    @property
    def id(self) -> str: ...


R = TypeVar("R", bound=_Record)


class Handle(Generic[R]):
    def __init__(self, ctl: NetworkController, record: R) -> None:
        self._ctl = ctl
        self._rec = record

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.id == self.id  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.id))

    @property
    def record(self) -> R:
        """The stored record this handle was made from (or last refreshed with)."""
        return self._rec

    @property
    def id(self) -> str:
        return self._rec.id
