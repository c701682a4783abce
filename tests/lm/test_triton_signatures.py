"""The Triton kernels of ``notelab.lm`` as inductor launches them: a ``triton_op``'s kernels are launched from the
compiled step with every argument by position, so a parameter with a default that a launch leaves out shifts the
ones after it (the compiled step then fails on the card and the engine falls back to its eager step). Read from the
kernels' signatures: no GPU or interpreter needed."""

import importlib
import inspect

import pytest

triton_jit = pytest.importorskip("triton.runtime.jit")

MODULES = ("notelab.lm.attend", "notelab.lm.chain", "notelab.lm.nucleus", "notelab.lm.skinny", "notelab.lm.triton_env")


def kernels(name: str) -> dict:
    module = importlib.import_module(name)
    if module.triton is None:
        pytest.skip(f"{name}: triton is not importable here")
    return {k: v for k, v in vars(module).items() if isinstance(v, triton_jit.KernelInterface)}


@pytest.mark.parametrize("name", MODULES)
def test_no_kernel_parameter_has_a_default(name):
    found = kernels(name)
    assert found, f"{name}: no Triton kernels found"
    for kernel_name, kernel in found.items():
        defaulted = [p.name for p in inspect.signature(kernel.fn).parameters.values() if p.default is not p.empty]
        assert not defaulted, f"{name}.{kernel_name}: parameters with a default {defaulted}"
