"""rolevec: role vectors for steering language models toward a domain expertise."""

from .errors import RolevecError

__version__ = "0.1.0"

__all__ = ["RolevecError", "__version__"]
