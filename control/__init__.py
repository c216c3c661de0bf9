"""cnm.control: the CNM control plane (NetworkController, Network, Endpoint, Sandbox).

from cnm.control import NetworkController, IPAMConfig, errors
"""

from . import errors
from .controller import NetworkController
from .endpoint import Endpoint
from .network import Network
from .reconcile import ReconcileReport
from .sandbox import Sandbox
from .types import IPAMConfig, Repair

__all__ = [
    "Endpoint",
    "IPAMConfig",
    "Network",
    "NetworkController",
    "ReconcileReport",
    "Repair",
    "Sandbox",
    "errors",
]
