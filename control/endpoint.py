"""The Endpoint handle: joins one sandbox to one network.

A typed view over the stored record; join, leave and delete go through the controller.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from .handle import Handle
from .types import EndpointRecord

if TYPE_CHECKING:
    from .network import Network
    from .sandbox import Sandbox


class Endpoint(Handle[EndpointRecord]):
    def __repr__(self) -> str:
        return f"<Endpoint {self.name} {self.id[:12]} network={self._rec.network_id[:12]}>"

    @property
    def name(self) -> str:
        return self._rec.name

    @property
    def network(self) -> Network:
        return self._ctl._network_by_id(self._rec.network_id)

    @property
    def ipv4_address(self) -> ipaddress.IPv4Interface | None:
        a = self._rec.ipv4_address
        return ipaddress.IPv4Interface(a) if a else None

    @property
    def ipv6_address(self) -> ipaddress.IPv6Interface | None:
        a = self._rec.ipv6_address
        return ipaddress.IPv6Interface(a) if a else None

    @property
    def mac_address(self) -> str:
        return self._rec.mac_address

    @property
    def options(self) -> dict[str, str]:
        return dict(self._rec.options)

    @property
    def sandbox(self) -> Sandbox | None:
        """The sandbox this endpoint is joined to, read fresh from the store."""
        self.refresh()
        if self._rec.sandbox_id is None or self._rec.join_state != "joined":
            return None
        return self._ctl._sandbox_by_id(self._rec.sandbox_id)

    def refresh(self) -> Endpoint:
        self._rec = self._ctl._endpoint_record(self._rec.id)
        return self

    def join(self, sandbox: str | Sandbox) -> str:
        """Join a container (by id, or an existing Sandbox); returns the sandbox key."""
        return self._ctl._join_one(self, sandbox)

    def leave(self, sandbox: str | Sandbox) -> None:
        self._ctl.leave_many([(self, sandbox)])

    def delete(self, force: bool = False) -> None:
        """Delete the endpoint; refused while joined unless force (which leaves first)."""
        self._ctl._delete_endpoints([self], force=force)

    def to_dict(self) -> dict[str, Any]:
        r = self._rec
        return {
            "id": r.id,
            "name": r.name,
            "network_id": r.network_id,
            "ipv4_address": r.ipv4_address,
            "ipv6_address": r.ipv6_address,
            "mac_address": r.mac_address,
            "options": r.options,
            "sandbox_id": r.sandbox_id if r.join_state == "joined" else None,
            "state": r.state,
            "join_state": r.join_state,
        }
