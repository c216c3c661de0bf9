"""The OS layer: the only part of the control plane that touches the kernel.

Drivers and the controller ask osl for kernel objects, so batching, rollback and naming
live in one place. It uses cnm.fastpath underneath and never imports the controller.
"""

from .namespace import NamespaceStore

__all__ = ["NamespaceStore"]
