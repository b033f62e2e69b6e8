"""What a module imports, read from its source: for the tests that keep the layers and the pure modules pure."""

import ast
import importlib.util
from pathlib import Path
from types import ModuleType


def imports_of(module: ModuleType) -> set[str]:
    """The modules a module imports by name (`from a import b` counts as `a.b` when b is a module)."""
    tree = ast.parse(Path(str(module.__file__)).read_text())
    found = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if _is_module(submodule) else node.module)
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):  # a package without a spec (some C extensions)
        return False
