"""The Sandbox handle: one container's network stack, keyed by its netns path.

A sandbox made by a join lives while it has endpoints; one made with
`create_sandbox()` lives until deleted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .handle import Handle
from .types import SandboxRecord

if TYPE_CHECKING:
    from .endpoint import Endpoint


class Sandbox(Handle[SandboxRecord]):
    def __repr__(self) -> str:
        return f"<Sandbox {self.id[:12]} container={self.container_id}>"

    @property
    def container_id(self) -> str:
        return self._rec.container_id

    @property
    def key(self) -> str:
        """The sandbox key: the path of its network namespace."""
        return self._rec.key

    @property
    def explicit(self) -> bool:
        return self._rec.explicit

    @property
    def hostname(self) -> str | None:
        return self._rec.hostname

    @property
    def dns(self) -> list[str]:
        return list(self._rec.dns)

    @property
    def dns_search(self) -> list[str]:
        return list(self._rec.dns_search)

    @property
    def extra_hosts(self) -> list[str]:
        return list(self._rec.extra_hosts)

    def endpoints(self) -> list[Endpoint]:
        return self._ctl._sandbox_endpoints(self)

    def delete(self) -> None:
        """Leave every endpoint still joined, then remove the namespace and the record."""
        self._ctl._delete_sandbox(self)

    def to_dict(self) -> dict[str, Any]:
        r = self._rec
        return {
            "id": r.id,
            "container_id": r.container_id,
            "key": r.key,
            "explicit": r.explicit,
            "hostname": r.hostname,
            "dns": list(r.dns),
            "dns_search": list(r.dns_search),
            "extra_hosts": list(r.extra_hosts),
            "state": r.state,
            "endpoints": [e.id for e in self.endpoints()],
        }
