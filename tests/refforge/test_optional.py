"""refforge.optional: the one way refforge imports a package of an extra."""

from __future__ import annotations

import doctest
import json
import sys
import uuid

import pytest

import refforge.optional as optional
from refforge.optional import MissingPackage, check_packages, install_command, require


def _absent() -> str:
    return f"refforge_absent_{uuid.uuid4().hex}"


def test_require_returns_a_present_module():
    assert require("json", "models") is json


def test_a_missing_package_names_itself_and_ends_with_the_install_command():
    name = _absent()
    with pytest.raises(MissingPackage) as e:
        require(name, "hf")
    assert isinstance(e.value, ImportError)
    msg = str(e.value)
    assert name in msg
    assert msg.endswith("pip install 'refforge[hf]'")
    assert msg.endswith(install_command("hf"))


def test_the_feature_is_named_in_the_message():
    name = _absent()
    with pytest.raises(MissingPackage) as e:
        require(f"{name}.sub", "dask", feature="runner.kind = 'dask'")
    assert str(e.value) == f"runner.kind = 'dask' needs {name}: pip install 'refforge[dask]'"


def test_check_packages_names_every_missing_module_and_each_install_command_once():
    a, b, c = _absent(), _absent(), _absent()
    with pytest.raises(MissingPackage) as e:
        check_packages([(a, "models"), ("json", "models"), (b, "hf"), (c, "models")], "the stage x")
    msg = str(e.value)
    assert msg.startswith("the stage x needs ")
    assert a in msg and b in msg and c in msg and "json" not in msg
    assert msg.endswith("pip install 'refforge[models]' and pip install 'refforge[hf]'")
    assert msg.count("refforge[models]") == 1


def test_check_packages_passes_when_everything_is_there():
    check_packages([("json", "models"), ("importlib.util", "models")], "nothing")
    check_packages([], "nothing")


def test_a_present_package_whose_own_dependency_is_missing_shows_the_original_error(tmp_path, monkeypatch):
    pkg, dep = _absent(), _absent()
    (tmp_path / f"{pkg}.py").write_text(f"import {dep}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ImportError) as e:
            require(pkg, "models")
        assert not isinstance(e.value, MissingPackage)
        assert e.value.name == dep
        assert "pip install" not in str(e.value)
        # check_packages only looks the module up: it is there
        check_packages([(pkg, "models")], "x")
    finally:
        sys.modules.pop(pkg, None)


def test_doctests_run():
    result = doctest.testmod(optional)
    assert result.attempted >= 2 and result.failed == 0
