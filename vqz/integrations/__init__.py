"""vqz as a plugin of other libraries, registered when vqz is imported.

diffusers: vqz becomes the quantization backend "vqz" (`vqz.integrations.diffusers`) the moment
diffusers loads its registry of backends, so that `from_pretrained` of a saved vqz model works in
any script that imported vqz, while importing vqz alone never imports diffusers (seconds).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

DIFFUSERS_REGISTRY = "diffusers.quantizers.auto"


def _register_diffusers() -> None:
    try:
        importlib.import_module(".diffusers", __name__)  # registers itself once imported
    except ImportError as e:
        # Raising here would fail the user's own import of diffusers.
        warnings.warn(str(e), stacklevel=2)


def install() -> None:
    """Register vqz with diffusers now if diffusers' registry is loaded, else right after it loads.
    Does nothing when diffusers is not installed."""
    if importlib.util.find_spec("diffusers") is None:
        return
    if DIFFUSERS_REGISTRY in sys.modules:
        _register_diffusers()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(DIFFUSERS_REGISTRY, _register_diffusers))


class _AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot finder that lets the other finders find module `name`, and has `callback()` run
    right after the module's code has run."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if find is None else find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenCall(spec.loader, self.callback)
                return spec
        return None


class _ThenCall(importlib.abc.Loader):
    """`loader`, with `callback()` run after it executes a module."""

    def __init__(self, loader, callback):
        self.loader, self.callback = loader, callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.callback()

    def __getattr__(self, name):  # get_source, get_resource_reader, ...: the real loader's
        return getattr(self.loader, name)


install()
