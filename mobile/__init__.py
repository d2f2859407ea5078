"""mobile: run Mixture-of-Experts LMs on a GPU too small to hold them.

Specs (YAML) are lowered to a dataflow graph, scheduled by passes, emitted to graphs/NAME/, and
run by the Engine with a policy that decides where experts live and which ones a token uses.
"""

from mobile.engine import Engine
from mobile.errors import MobileError

__all__ = ["Engine", "MobileError"]
__version__ = "0.1.0"
