"""ICMP echo from inside a sandbox: proof that packets really flow.

Owns a minimal ping (IPv4 ICMP and IPv6 ICMPv6 echo on a raw socket opened inside the
sandbox's namespace by the namespace worker): no `ping` process.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import time

from cnm.fastpath import netns

from .. import errors

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _echo(dst: IPAddress, timeout: float) -> float:
    ident = os.getpid() & 0xFFFF
    seq = int(time.monotonic() * 1000) & 0xFFFF
    payload = b"cnm-ping" + os.urandom(8)
    if dst.version == 4:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload
        reply_type = 0
    else:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        packet = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + payload  # kernel sums v6
        reply_type = 129
    with sock:
        start = time.monotonic()
        sock.sendto(packet, (str(dst), 0))
        deadline = start + timeout
        # poll, not select: a host with thousands of sandboxes holds descriptors past
        # select's limit of 1024.
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            if not poller.poll(left * 1000):
                break
            data, _ = sock.recvfrom(2048)
            icmp = data[(data[0] & 0x0F) * 4 :] if dst.version == 4 else data
            if (
                len(icmp) >= 8 + len(payload)
                and icmp[0] == reply_type
                and icmp[8 : 8 + len(payload)] == payload
            ):
                return time.monotonic() - start
    raise TimeoutError(f"no echo reply from {dst} within {timeout}s")


def ping(key: str, dst: IPAddress | str, *, timeout: float = 1.0) -> float:
    """One echo request from inside the sandbox at `key`; the round trip in seconds.

    Raises errors.Unavailable when no reply comes within `timeout`.
    """
    target = ipaddress.ip_address(dst)
    try:
        return netns.run_in(key, lambda: _echo(target, timeout))
    except TimeoutError as exc:
        raise errors.Unavailable(f"ping {target} from {key}: {exc}") from None
    except OSError as exc:
        raise errors.KernelError(
            exc.errno or 0, exc.strerror or str(exc), operation=f"ping {target} from {key}"
        ) from None
