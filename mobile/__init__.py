"""mobile: run Mixture-of-Experts LMs on a GPU too small to hold them.

Specs (YAML) are lowered to a dataflow graph, scheduled by passes, emitted to graphs/NAME/, and
run by the Engine with a policy that decides where experts live and which ones a token uses.

`mobile.Engine` is imported on first use, so that the command line (`mobile --help`, bad flags,
Ctrl-C at start-up) answers without importing torch.
"""

from mobile.errors import MobileError

__all__ = ["Engine", "MobileError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Engine":
        from mobile.runtime.engine import Engine

        return Engine
    raise AttributeError(f"module 'mobile' has no attribute {name!r}")
