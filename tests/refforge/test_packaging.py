"""The wheel maps flows/ stages/ schemas/ storage/ prompts/ configs/ into refforge.* and ships the
templates and the demo config: installed from the wheel alone (not this checkout), it imports and runs."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the repository


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
                   check=True, timeout=600)
    (whl,) = dist.glob("refforge-*.whl")
    return whl


def test_wheel_contains_the_mapped_packages_and_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("refforge/cli.py", "refforge/flows/build.py", "refforge/flows/registry.py",
                     "refforge/pipeline/stage.py", "refforge/stages/paths/search.py",
                     "refforge/stages/scene/templates.py", "refforge/schemas/tables.py",
                     "refforge/storage/shards.py", "refforge/configs/demo.toml"):
        assert required in names, required
    # every package of the source tree is in the wheel (pyproject lists them one by one)
    mapped = {"refforge": "refforge", "flows": "refforge/flows", "stages": "refforge/stages",
              "schemas": "refforge/schemas", "storage": "refforge/storage", "prompts": "refforge/prompts",
              "configs": "refforge/configs"}
    for folder, target in mapped.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT / folder).as_posix()
            assert f"{target}/{rel}" in names, f"{folder}/{rel} is not in the wheel: add it to pyproject's packages"
    assert any(n.startswith("refforge/prompts/paths/") and n.endswith(".j2") for n in names)
    assert not any(n.startswith(("stages/", "storage/", "schemas/", "flows/", "tests/")) for n in names)


def test_installed_wheel_imports_and_runs_outside_the_checkout(wheel, tmp_path, subprocess_env):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    env = dict(subprocess_env, PYTHONPATH=str(target))
    code = (
        "import refforge, refforge.stages.paths, refforge.stages.scene.templates as t\n"
        f"assert refforge.__file__.startswith({str(target)!r}), refforge.__file__\n"
        "assert t.all_template_hashes(), 'templates not shipped'\n"
        "from refforge.config import load_config; assert load_config().build.name == 'demo'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env, timeout=120)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("[build]\nname = 'tiny'\nshard_size = 2\nstages = ['ingest', 'paths']\n[source]\nimages = 3\n")
    proc = subprocess.run([sys.executable, "-m", "refforge.cli", "build", "--config", str(cfg), "--out",
                           str(tmp_path / "b")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 images" in proc.stdout
