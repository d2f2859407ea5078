from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU under its interpreter (tests/test_kernels.py); it is read when
    # triton first compiles a kernel, so set it before any test imports one
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from tiny import build_tiny, save_char_tokenizer  # noqa: E402

from mobile.cli import main  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def kernel_cache(tmp_path_factory):
    """The C kernels (mobile.moe.cbuild) compile into the test session's folder, not the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOBILE_CACHE", str(tmp_path_factory.getbasetemp() / "kernels"))
        yield


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def run_cli_within(seconds: float, *args: str) -> int:
    """run_cli on a thread that must end within `seconds` (a run that hangs fails the test)."""
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(run_cli(*args)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "the run hangs"
    return result[0]


class Tiny:
    """A tiny checkpoint, its imported spec and its compiled graph, plus the transformers model."""

    def __init__(self, root: Path, family: str):
        self.root, self.family = root, family
        self.ckpt = root / "ckpt"
        self.model = self.build(self.ckpt)
        save_char_tokenizer(self.ckpt)
        self.spec = root / "spec.yaml"
        self.graph = root / "graph"
        assert run_cli("import-hf", self.ckpt, "-o", self.spec) == 0
        assert run_cli("compile", self.spec, "-o", self.graph) == 0

    def build(self, ckpt: Path):
        """Save the tiny checkpoint to ckpt/; returns the transformers model (subclasses build others)."""
        return build_tiny(self.family, ckpt)

    def compile(self, out: Path, *options: str, slots_per_layer: int) -> Path:
        """This checkpoint's spec with a bounded expert cache, compiled into out/ (extra CLI options
        such as --policy pass through); returns the graph folder."""
        text = self.spec.read_text().replace(
            "runtime:\n", f"runtime:\n  expert_cache:\n    slots_per_layer: {slots_per_layer}\n")
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.yaml").write_text(text.replace("path: ckpt", f"path: {self.ckpt}"))
        assert run_cli("compile", out / "spec.yaml", "-o", out / "graph", *options) == 0
        return out / "graph"


def tiny_cache(tmp_path_factory, make=Tiny):
    """name -> make(a fresh folder, name), each built once: what a `tiny` fixture returns."""
    cache: dict[str, Tiny] = {}

    def get(name: str) -> Tiny:
        if name not in cache:
            cache[name] = make(tmp_path_factory.mktemp(name), name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_cache(tmp_path_factory)
