"""IPAM: the driver contract, the default pools, and the default IPAM on the store."""

from .api import IpamDriver, PoolRequest, PoolResult
from .default import DefaultIpam

__all__ = ["DefaultIpam", "IpamDriver", "PoolRequest", "PoolResult"]
