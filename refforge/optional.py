"""Optional packages: the one way refforge imports a package that an extra installs.

>>> require("json", "models").__name__
'json'
>>> require("no_such_package_xyz", "models")
Traceback (most recent call last):
...
refforge.optional.MissingPackage: no_such_package_xyz is not installed: pip install 'refforge[models]'

Core dependencies (pyproject's ``dependencies``) are imported at module top like any other import;
only the packages of an extra go through :func:`require`, and a stage names them in its ``packages``
so that a build checks them before any unit runs (:func:`check_packages`).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable
from types import ModuleType

# extra -> what pip installs for it (the extras of pyproject.toml)
EXTRAS = ("models", "hf", "dask", "review", "dev")


class MissingPackage(ImportError):
    """An optional package is not installed; the message ends with the exact install command."""


def install_command(extra: str) -> str:
    return f"pip install 'refforge[{extra}]'"


def require(module: str, extra: str, *, feature: str | None = None) -> ModuleType:
    """Import ``module`` (a package of the ``extra``), or fail with the install command.

    ``feature`` names what needs it ("runner.kind = 'dask'"), for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name not in (None, top, module) and not (e.name or "").startswith(top + "."):
            raise  # the package is there but one of its own dependencies is missing: show that error
        who = f"{feature} needs {top}" if feature else f"{top} is not installed"
        raise MissingPackage(f"{who}: {install_command(extra)}") from None


def missing(packages: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The ``(module, extra)`` pairs whose module cannot be found (nothing is imported)."""
    out = []
    for module, extra in packages:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append((module, extra))
    return out


def check_packages(packages: Iterable[tuple[str, str]], feature: str) -> None:
    """Fail with one message naming every missing module and the install command(s) for them."""
    gone = missing(packages)
    if gone:
        names = ", ".join(m for m, _ in gone)
        commands = " and ".join(dict.fromkeys(install_command(x) for _, x in gone))
        raise MissingPackage(f"{feature} needs {names}, not installed: {commands}")
