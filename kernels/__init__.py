"""Triton kernels, shipped as `mobile.kernels` (pyproject.toml maps this folder there).

Each kernel has a plain-torch reference in mobile.moe and is tested against it, on the CPU with
TRITON_INTERPRET=1 and on a GPU when one is available.

Whenever the repository root is first on the import path (`python -m pytest`, `python -c` from
the root), this folder is also visible as a top-level `kernels`, the name of a PyPI package that
transformers imports. Imported under that name, it stands aside: it loads the installed package
in its own place, so that no import of `kernels` ever sees this folder.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None or _spec.loader is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r} (the folder {os.path.dirname(__file__)} is "
                                  "mobile.kernels, not that package)", name=__name__)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds once this file ends
    _spec.loader.exec_module(_module)
