"""Stand-in modules for packages the reference imports but its fitting never uses.

For machines where the reference's full dependency tree cannot be installed (the lent GPU
machine reaches no package index and takes at most 64 MiB of carried wheels): keypoint-moseq
imports its plotting, widget, video and NWB libraries at import time. ``install(names)`` makes
each of ``names`` that is *not* importable import as a permissive stand-in: any attribute is
another stand-in, calling one returns a stand-in (or, called on a single function, that
function, as a decorator would), and one can be subclassed. Packages that are installed are
never replaced. A stand-in used for real (a plot, a video) fails loudly only when it is used.

Only ``_compare_worker.py`` uses this, and only when ``KPMS_BENCH_STAND_INS`` names packages.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types


class StandIn:
    """Anything: attributes, calls, subclassing, iteration, context management."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return StandIn(f"{self._name}.{name}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], StandIn):
            return args[0]  # used as a decorator
        return StandIn(f"{self._name}()")

    def __mro_entries__(self, bases):
        return (object,)

    def __iter__(self):
        return iter(())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getitem__(self, key):
        return StandIn(f"{self._name}[...]")

    def __or__(self, other):  # type annotations such as ``StandIn | None``
        return self

    __ror__ = __or__

    def __repr__(self):
        return f"<stand-in {self._name}>"


class _StandInModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return StandIn(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in self.roots:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        module.__version__ = "0+stand-in"
        return module

    def exec_module(self, module):
        pass


def install(names) -> list[str]:
    """Stand in for each of ``names`` (top-level packages) that is not importable; returns those."""
    missing = [n for n in names if n and n not in sys.modules and importlib.util.find_spec(n) is None]
    if missing:
        sys.meta_path.append(_Finder(missing))
    return missing
