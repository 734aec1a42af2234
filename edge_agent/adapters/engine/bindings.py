"""llama.cpp's C API: llama-cpp-python's ctypes bindings, without the rest of the package.

Part of the llama.cpp adapter (only context.py imports `bindings` from here, as `llama`).
`import llama_cpp` runs the package's __init__, which also imports the high-level `Llama`
class and with it jinja2 (chat formats), diskcache, multiprocessing and numpy's extras:
about 6 MiB resident in every agent that the engine never uses (`python -m bench.memory
imports`). The engine needs only the bindings, `llama_cpp.llama_cpp`; this module imports
them under a bare package module, so llama_cpp/__init__.py does not run.

The bare package still answers for the whole one: the first time anything asks it for
another name (`llama_cpp.Llama`, as the tests and benchmarks do after the engine is
loaded), its real __init__ runs in it. If the bare package cannot be set up (a
llama-cpp-python laid out otherwise), the ordinary import is used. A library that fails
to load (OSError from ctypes) is raised as before, for service/loader.import_engine to
name the missing system package.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Any

__all__ = ["bindings", "load_bindings"]

PACKAGE = "llama_cpp"
BINDINGS = "llama_cpp.llama_cpp"
_lock = threading.RLock()  # the package's __init__ may come back here


def load_bindings() -> ModuleType:
    """`llama_cpp.llama_cpp`, imported without running llama_cpp/__init__.py if it can be."""
    with _lock:
        if BINDINGS in sys.modules or PACKAGE in sys.modules:
            return importlib.import_module(BINDINGS)
        package = _bare_package()
        if package is None:
            return importlib.import_module(BINDINGS)
        sys.modules[PACKAGE] = package
        try:
            return importlib.import_module(BINDINGS)
        except ImportError:
            _forget(package)  # the bindings need their package after all: the usual way
            return importlib.import_module(BINDINGS)
        except BaseException:
            _forget(package)
            raise


def _bare_package() -> ModuleType | None:
    """The llama_cpp package as a module object whose __init__ has not run, or None."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.loader is None or not spec.submodule_search_locations:
        return None
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def complete(name: str) -> Any:
        # PEP 562: called for a name the module does not have. Run the package's own
        # __init__ in this module object once, then look again.
        with _lock:
            if package.__dict__.pop("__getattr__", None) is not None:
                loader.exec_module(package)
        return getattr(package, name)

    package.__dict__["__getattr__"] = complete
    return package


def _forget(package: ModuleType) -> None:
    """Undo a failed attempt: the bare package and whatever was imported under it."""
    if sys.modules.get(PACKAGE) is package:
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]


if TYPE_CHECKING:
    import llama_cpp.llama_cpp as bindings
else:
    bindings = load_bindings()
