"""Optional dependencies: imported where needed, with the vqz extra that brings them."""
from __future__ import annotations

import importlib


def require(module: str, extra: str):
    """Import `module`, or raise ImportError naming the `pip install 'vqz[extra]'` that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed here: pip install 'vqz[{extra}]'") from e
