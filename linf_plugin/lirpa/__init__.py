"""auto_LiRPA integration: the compat layer (applied on import) and, once the
plugin is built, the ``custom::LpDist`` operator with its ``BoundLpDist``."""
from . import compat

compat.apply()

__all__ = ["compat"]
