"""A build directory: its config, tables, image store, work ledger and run files.

```
<build>/
  build.toml          the resolved config (its hash identifies the build)
  tables/<table>/part-<run>-<writer>-<seq>.parquet
  images/<ab>/<sha256>.<ext>
  state/<stage>/<work_key>.json   one per finished unit of work (the resume ledger)
  runs/<run_id>.json  provenance of each run
```
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refforge._strict import ConfigError

from .atomic import atomic_write_bytes, remove_stale_tmp
from .faults import crash_point
from .images import ImageStore
from .shards import ShardWriter, TableReader

if TYPE_CHECKING:  # refforge.config sits above storage (it imports the stages)
    from refforge.config import ConfigBase as Config


class BuildConflict(ConfigError):
    pass


def new_run_id() -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{now}-{os.urandom(3).hex()}"


class BuildDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tables_dir = self.root / "tables"
        self.state_dir = self.root / "state"
        self.runs_dir = self.root / "runs"
        self.images = ImageStore(self.root)
        self.reader = TableReader(self.tables_dir)

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, root: Path, config: Config, force: bool = False) -> tuple[BuildDir, bool]:
        """Open ``root`` for ``config``; returns (build, resumed).

        An existing build with another config hash is refused unless ``force``, which deletes the
        old build's tables, images, ledger and runs first.
        """
        b = cls(root)
        cfg_file = b.root / "build.toml"
        resumed = False
        if cfg_file.exists():
            old_hash = b.config_hash(type(config))
            if old_hash != config.config_hash():
                if not force:
                    raise BuildConflict(
                        f"{b.root} holds a build with another config or stage versions (hash {old_hash[:12]}, "
                        f"this config {config.config_hash()[:12]}); use a new --out directory or --force to "
                        "replace it")
                for sub in ("tables", "images", "state", "runs", "report"):
                    shutil.rmtree(b.root / sub, ignore_errors=True)
                cfg_file.unlink()
            else:
                resumed = True
        elif b.root.exists() and any(b.root.iterdir()) and not force:
            raise BuildConflict(f"{b.root} exists, is not empty and is not a refforge build; choose another --out")
        for d in (b.tables_dir, b.state_dir, b.runs_dir, b.root / "images"):
            d.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(b.root)
        if not cfg_file.exists():
            identity = {"config_hash": config.config_hash(), "stage_versions": config.data_dict()["stage_versions"]}
            atomic_write_bytes(b.state_dir / "build.json", json.dumps(identity, sort_keys=True).encode())
            atomic_write_bytes(cfg_file, config.to_toml().encode())
        return b, resumed

    @classmethod
    def open(cls, root: Path) -> BuildDir:
        b = cls(root)
        if not (b.root / "build.toml").exists():
            raise FileNotFoundError(f"{b.root} is not a refforge build (no build.toml)")
        return b

    def config_hash(self, model: type[Config] | None = None) -> str:
        """The hash the build was created with (config and stage code versions at that time). Builds
        made before ``state/build.json`` existed: ``build.toml`` read with ``model`` (a Config class)."""
        ident = self.state_dir / "build.json"
        if ident.exists():
            return json.loads(ident.read_text())["config_hash"]
        if model is None:
            raise FileNotFoundError(f"{ident} is missing: the build's identity is unknown")
        return self.config(model).config_hash()

    def config(self, model: type[Config]) -> Config:
        """The build's resolved config (``build.toml``), read with ``model`` (a Config class)."""
        path = self.root / "build.toml"
        return model.model_validate(tomllib.loads(path.read_text()))

    def writer(self, run_id: str) -> ShardWriter:
        return ShardWriter(self.tables_dir, run_id)

    # -- resume ledger -------------------------------------------------------------------------
    def _ledger_path(self, stage: str, work_key: str) -> Path:
        return self.state_dir / stage / f"{work_key}.json"

    def done(self, stage: str, work_key: str) -> dict[str, Any] | None:
        p = self._ledger_path(stage, work_key)
        return json.loads(p.read_text()) if p.exists() else None

    def mark_done(self, stage: str, work_key: str, record: dict[str, Any]) -> None:
        crash_point("ledger.before")
        atomic_write_bytes(self._ledger_path(stage, work_key), json.dumps(record, sort_keys=True).encode())

    def ledger(self, stage: str) -> list[dict[str, Any]]:
        folder = self.state_dir / stage
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []

    # -- provenance ----------------------------------------------------------------------------
    def write_run(self, run_id: str, payload: dict[str, Any]) -> Path:
        path = self.runs_dir / f"{run_id}.json"
        atomic_write_bytes(path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())
        return path

    def runs(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.runs_dir.glob("*.json"))]
