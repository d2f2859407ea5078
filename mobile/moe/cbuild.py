"""The C kernels of kernels/ (the host expert kernel, the keep rule's CPU kernel), compiled on first
use with the machine's C compiler into a cache folder, and loaded with ctypes: a few kilobytes of C
compile in about a second, where a torch C++ extension takes a minute."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from mobile.errors import MobileError


def cache_dir() -> Path:
    """Where compiled kernels live: $MOBILE_CACHE, else $XDG_CACHE_HOME/mobile, else ~/.cache/mobile."""
    if os.environ.get("MOBILE_CACHE"):
        return Path(os.environ["MOBILE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mobile"


def compiler() -> str | None:
    return shutil.which("gcc") or shutil.which("cc")


def build(source: str, flags: list[str], tag: str = "") -> ctypes.CDLL:
    """kernels/<source> compiled with `flags` (once per source text and flags, atomically, so that
    concurrent first uses never load half a file) and loaded. tag: a word in the file's name."""
    text = (resources.files("mobile.kernels") / source).read_bytes()
    digest = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]
    stem = Path(source).stem
    path = cache_dir() / f"{stem}-{tag + '-' if tag else ''}{digest}.so"
    if not path.exists():
        cc = compiler()
        if cc is None:
            raise MobileError(f"kernels/{source} is compiled on first use, and no C compiler (gcc or cc) is on PATH")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, out = Path(tmp) / source, Path(tmp) / f"{stem}.so"
            src.write_bytes(text)
            done = subprocess.run([cc, *flags, str(src), "-o", str(out), "-lm"], capture_output=True, text=True)
            if done.returncode != 0:
                raise MobileError(f"could not compile kernels/{source} ({cc}): {done.stderr.strip()[-500:]}")
            os.replace(out, path)
    return ctypes.CDLL(str(path))
