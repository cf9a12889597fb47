"""Kernel tests run compiled on a CUDA machine and through Triton's CPU interpreter elsewhere.

Without CUDA, TRITON_INTERPRET=1 is set while kiln.runtime.kernels is imported here (it is read
when a kernel is decorated; the package is reloaded if something imported it earlier) and while
each test of this folder runs (Triton reads it again lazily), and restored in between: other test
folders see the environment they started with.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def _set_interpret(value: str | None) -> str | None:
    previous = os.environ.get("TRITON_INTERPRET")
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value
    return previous


def _import_kernels_interpreted() -> None:
    previous = _set_interpret("1")
    try:
        names = sorted(n for n in sys.modules if n.startswith("kiln.runtime.kernels."))
        for name in names:
            importlib.reload(sys.modules[name])
        module = importlib.import_module("kiln.runtime.kernels")
        if names:
            importlib.reload(module)
    finally:
        _set_interpret(previous)


def import_interpreted(name: str, probe: str):
    """Kernel module ``name`` (one kiln.runtime.kernels does not re-export, so the import above
    did not cover it), imported under the interpreter without CUDA; ``probe`` names one of its
    kernels, to tell an interpreted import from an earlier compiled one."""
    module = sys.modules.get(name)
    if HAS_CUDA or (module and type(getattr(module, probe)).__name__ == "InterpretedFunction"):
        return module or importlib.import_module(name)
    previous = _set_interpret("1")
    try:
        return importlib.reload(module) if module else importlib.import_module(name)
    finally:
        _set_interpret(previous)


if HAS_CUDA:
    # Deterministic mode (used below to poison outputs) needs this for any cuBLAS call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
else:
    _import_kernels_interpreted()


@pytest.fixture(autouse=True)
def interpret_without_cuda():
    if HAS_CUDA:
        yield
        return
    previous = _set_interpret("1")
    yield
    _set_interpret(previous)


@pytest.fixture(autouse=True)
def poison_new_tensors():
    """torch.empty & co. return NaN while a test runs, so any output element a kernel fails to
    write shows up as NaN in the comparison (deterministic mode fills uninitialised memory)."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was)


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def gen() -> torch.Generator:
    # Fresh inputs per test, but reproducible from the test's own seed when a failure must be replayed.
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(4), "little"))
    return g
