"""`import robustbench` in an environment where it fails as installed, without editing site-packages.

robustbench 1.1.1 (Croce et al., "RobustBench: a standardized adversarial robustness benchmark", NeurIPS
2021 Datasets and Benchmarks) imports two modules that a current environment does not have under those names:

    autoattack      AutoAttack's GitHub package; PyPI ships the same code as `pyautoattack`
                    (robustbench.eval: `from autoattack import AutoAttack`, `from autoattack.state import ...`)
    pkg_resources   gone from setuptools >= 81 (robustbench.loaders: `pkg_resources.resource_filename`)

`import_robustbench()` imports it with both names bound only while its modules are imported: `autoattack`
(and `autoattack.state`) to pyautoattack, `pkg_resources` to a one-function stand-in whose
`resource_filename(module, path)` is the file beside that module, which is what pkg_resources returns
for an installed package. Whatever the real environment has wins (the GitHub `autoattack`, an old
setuptools). Afterwards sys.modules is as it was except for robustbench's own modules: robustbench keeps
its references, nothing else sees the stand-ins. Nothing is downloaded: importing robustbench reads no
network; only its `load_model` downloads, and flatrobust never calls it (`robustbench_zoo` reads the
weights file itself).

Chosen over pinning setuptools < 81 in the `[robustbench]` extra: that would downgrade the build tool of
every environment the extra is installed into, for one function that reads a file path.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path
from typing import Iterator


class RobustBenchMissing(ImportError):
    """robustbench (or pyautoattack, which it needs) is not installed; the message says what to install."""


INSTALL = "pip install 'flatrobust[robustbench]' (robustbench==1.1.1 and pyautoattack)"


def _resource_filename(module: str, path: str) -> str:
    """pkg_resources.resource_filename for a module installed as files: `path` beside `module`'s file."""
    mod = sys.modules.get(module) or importlib.import_module(module)
    return str(Path(mod.__file__).resolve().parent / path)


def _stand_in_pkg_resources() -> types.ModuleType:
    module = types.ModuleType("pkg_resources", "flatrobust's stand-in: resource_filename only (robustbench.loaders)")
    module.resource_filename = _resource_filename
    return module


def _found(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def _stand_ins() -> Iterator[None]:
    """Bind `autoattack` and `pkg_resources` for the duration of robustbench's import, where missing."""
    added: dict[str, types.ModuleType] = {}
    if not _found("autoattack"):
        try:
            import pyautoattack
            import pyautoattack.state
        except ImportError:
            raise RobustBenchMissing(f"robustbench needs AutoAttack (the pyautoattack package), which is not installed: {INSTALL}") from None
        added |= {"autoattack": pyautoattack, "autoattack.state": pyautoattack.state}
    if not _found("pkg_resources"):
        added["pkg_resources"] = _stand_in_pkg_resources()
    before = {name: sys.modules.get(name) for name in added}
    sys.modules.update(added)
    try:
        yield
    finally:
        for name, module in before.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def import_robustbench() -> types.ModuleType:
    """The robustbench package, imported with the stand-ins above; RobustBenchMissing (one line) if not installed.

    Its import-time FutureWarnings (deprecated timm import paths) are silenced: they are robustbench's,
    not the user's, and say nothing about the model.
    """
    if "robustbench.model_zoo" in sys.modules and "robustbench.utils" in sys.modules:
        return sys.modules["robustbench"]
    if not _found("robustbench"):
        raise RobustBenchMissing(f"robustbench is not installed: {INSTALL}")
    with _stand_ins(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            rb = importlib.import_module("robustbench")
            importlib.import_module("robustbench.model_zoo")
            importlib.import_module("robustbench.utils")
        except ImportError as e:
            missing = getattr(e, "name", None) or str(e)
            raise RobustBenchMissing(f"robustbench could not be imported ({type(e).__name__}: {str(e).splitlines()[0][:120]}): "
                                     f"its dependency {missing!r} is missing; {INSTALL}") from None
    return rb
