"""Ping checks shared by the kernel tests: cnm's own osl.ping against the independent
`ping` of oracles.py, which must agree."""

from __future__ import annotations

import ipaddress

from cnm.control import errors
from cnm.control.osl.ping import ping as cnm_ping

from .oracles import ns_ping


def both_pings(key: str, address: object) -> bool:
    """The independent `ping` and cnm's osl.ping agree; the verdict.

    A round where they disagree (one echo lost on a loaded machine) is tried again, with
    a longer wait; only a disagreement that persists fails the test."""
    for timeout in (1, 2, 3):
        theirs = ns_ping(key, address, timeout=timeout)
        try:
            cnm_ping(key, ipaddress.ip_address(str(address)), timeout=float(timeout))
            ours = True
        except errors.CNMError:
            ours = False
        if theirs == ours:
            return theirs
    raise AssertionError(f"ping and osl.ping disagree about {address} from {key}")
