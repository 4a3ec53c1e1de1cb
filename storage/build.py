"""A build directory: its config, tables, image store, work ledger and run files.

```
<build>/
  .lock               held (flock) by the one process that builds here; holds its PID
  build.toml          the resolved config (its hash identifies the build)
  state/build.json    the build's identity (config hash, stage versions): a folder is a build only with it
  tables/<table>/part-<run>-<writer>-<seq>.parquet
  images/<ab>/<sha256>.<ext>
  state/<stage>/<work_key>.json   one per finished unit of work (the resume ledger)
  runs/<run_id>.json  provenance of each run
  sources/, report/, cache/       converted sources, the report, the model response cache
```
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import math
import os
import shutil
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refforge._strict import ConfigError

from .atomic import atomic_write_bytes, remove_if_stale, remove_stale_tmp, tmp_writer
from .faults import crash_point
from .images import ImageStore
from .shards import ShardWriter, TableReader

if TYPE_CHECKING:  # refforge.config sits above storage (it imports the stages)
    from refforge.config import ConfigBase as Config


class BuildConflict(ConfigError):
    pass


BUILD_FOLDERS = ("tables", "images", "state", "runs", "report", "sources", "cache")
"""The folders refforge makes in a build (all derived): what ``--force`` removes, with ``build.toml``,
and the only places where stale temporary files are cleaned up."""
LOCK_FILE = ".lock"
IDENTITY = "state/build.json"
_CLEARING = "(being replaced)"  # the identity's config hash while --force removes the old build


def new_run_id() -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f"{now}-{os.urandom(3).hex()}"


class BuildLock:
    """An exclusive OS lock (``flock``) on ``<build>/.lock``, which holds the PID of its holder.

    The lock belongs to the open file, so a second open of the same build in the same process conflicts
    too; the kernel releases it when the holder exits, however it exits (SIGKILL included). The PID is
    written (:meth:`stamp`) once the folder is known to be a build: a ``.lock`` of a folder refforge
    refuses is left as it was."""

    def __init__(self, path: Path, fd: int, created: bool):
        self.path = path
        self._fd: int | None = fd
        self.created = created  # the lock file did not exist before
        self._stamped = False

    @classmethod
    def acquire(cls, path: Path) -> BuildLock:
        while True:
            created = not path.exists()
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            except OSError as e:
                raise BuildConflict(f"cannot lock {path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _holder(fd)
                os.close(fd)
                who = f"pid {pid}" if pid else "pid unknown"
                raise BuildConflict(f"{path.parent} is in use by another refforge build ({who}); wait for it "
                                    "to finish or stop it") from None
            except OSError as e:
                os.close(fd)
                raise BuildConflict(f"cannot lock {path}: {e.strerror}") from None
            # a holder that gave up may have removed the file between our open and our lock: lock the file
            # that is there now
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        return cls(path, fd, created)

    def stamp(self) -> None:
        """Write this process's PID into the lock file (what a second build's error names)."""
        if self._fd is None:
            raise RuntimeError(f"{self.path} is not held")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        self._stamped = True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __del__(self) -> None:  # a lock nobody references any more is released, like a file is closed
        try:
            self.release()
        except Exception:
            pass

    def release(self, remove: bool = False) -> None:
        """Release the lock (again: nothing); ``remove`` deletes the lock file first."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if remove:
                self.path.unlink(missing_ok=True)
            elif self._stamped:
                os.ftruncate(fd, 0)  # no stale PID once released
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _holder(fd: int) -> int | None:
    """The PID in a lock file held by another (it writes it right after locking: wait a moment)."""
    for _ in range(20):
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.025)
    return None


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, Infinity) replaced by None, through dicts, lists and
    tuples: what strict JSON can hold.

    >>> finite({"auroc": float("nan"), "n": [1, float("inf"), 0.5]})
    {'auroc': None, 'n': [1, None, 0.5]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def strict_json(value: Any, **kwargs: Any) -> str:
    """Strict JSON (RFC 8259: no NaN or Infinity tokens) of ``value``, non-finite floats written as null."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


class BuildDir:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tables_dir = self.root / "tables"
        self.state_dir = self.root / "state"
        self.runs_dir = self.root / "runs"
        self.images = ImageStore(self.root)
        self.reader = TableReader(self.tables_dir)
        self._lock: BuildLock | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, root: Path, config: Config, force: bool = False) -> tuple[BuildDir, bool]:
        """Lock ``root`` and open it for ``config``; returns (build, resumed). The build holds the lock
        (``<root>/.lock``) until :meth:`release` (or the end of a ``with build:`` block, or of the process).

        A folder is a build only when its identity (``state/build.json``) says so. A non-empty folder
        without one is refused, even with ``force``. A build with another config hash is refused unless
        ``force``, which removes what refforge made there (:data:`BUILD_FOLDERS` and ``build.toml``) and
        nothing else. A second build of the same folder, while this one holds it, fails at once.
        """
        b = cls(root)
        try:
            b.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise BuildConflict(f"{b.root} exists and is not a folder; choose another --out") from None
        except OSError as e:
            raise BuildConflict(f"cannot make {b.root}: {e.strerror}") from None
        b._lock = BuildLock.acquire(b.root / LOCK_FILE)
        try:
            resumed = b._open_for(config, force)
        except BaseException:
            # a folder that is not a build gets no lock file from us
            b._lock.release(remove=b._lock.created and b.identity() is None)
            b._lock = None
            raise
        return b, resumed

    def _open_for(self, config: Config, force: bool) -> bool:
        ident = self.identity()
        cfg_file = self.root / "build.toml"
        new_hash = config.config_hash()
        if ident is None:
            if not self._fresh():
                raise BuildConflict(
                    f"{self.root} is not empty and is not a refforge build (no valid {IDENTITY}); refforge "
                    "leaves it alone, even with --force: choose another --out")
            resumed = False
        elif ident["config_hash"] != new_hash:
            self._lock.stamp()
            if not force:
                if ident["config_hash"] == _CLEARING:
                    raise BuildConflict(f"{self.root} holds a build whose replacement (--force) was interrupted; "
                                        "run again with --force to finish it")
                old_hash = ident["config_hash"]
                raise BuildConflict(
                    f"{self.root} holds a build with another config or stage versions (hash {old_hash[:12]}, "
                    f"this config {new_hash[:12]}); use a new --out directory or --force to replace it")
            self._clear()
            resumed = False
        else:
            resumed = True
        self._lock.stamp()
        if not resumed:
            # the identity first: from here on the folder is a build (a crash leaves a build to resume)
            identity = {"config_hash": new_hash, "stage_versions": config.data_dict()["stage_versions"]}
            atomic_write_bytes(self.root / IDENTITY, json.dumps(identity, sort_keys=True).encode())
        for d in (self.tables_dir, self.state_dir, self.runs_dir, self.root / "images"):
            d.mkdir(parents=True, exist_ok=True)
        self.remove_stale_tmp()
        if not resumed or not cfg_file.exists():
            atomic_write_bytes(cfg_file, config.to_toml().encode())
        return resumed

    def identity(self) -> dict[str, Any] | None:
        """The build's identity (``state/build.json``), or None where there is no valid one."""
        path = self.root / IDENTITY
        if self.state_dir.is_symlink() or path.is_symlink() or not path.is_file():
            return None
        try:
            ident = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(ident, dict) or not isinstance(ident.get("config_hash"), str):
            return None
        return ident

    def _fresh(self) -> bool:
        """Nothing in the folder but the lock and what an interrupted first write of the identity left."""
        for p in self.root.iterdir():
            if p.name == LOCK_FILE and p.is_file() and not p.is_symlink() and (
                    self._lock.created or p.read_text(errors="replace").strip().isdigit() or not p.stat().st_size):
                continue  # refforge's lock file
            if p.name == "state" and p.is_dir() and not p.is_symlink() and all(
                    c.is_file() and tmp_writer(c.name) is not None and c.name.startswith(".build.json.")
                    for c in p.iterdir()):
                continue
            return False
        return True

    def _clear(self) -> None:
        """Remove what refforge made in this build: the identity is marked first and goes last, so an
        interrupted --force leaves a build that only another --force opens."""
        marker = {"config_hash": _CLEARING}
        atomic_write_bytes(self.root / IDENTITY, json.dumps(marker).encode())
        for sub in BUILD_FOLDERS:
            if sub != "state":
                _remove(self.root / sub)
        (self.root / "build.toml").unlink(missing_ok=True)
        for p in self.state_dir.iterdir():
            if p.name != "build.json":
                _remove(p)

    def remove_stale_tmp(self) -> int:
        """Temporary files killed writers left in refforge's folders of the build (and of ``build.toml``)."""
        n = remove_stale_tmp(self.root, BUILD_FOLDERS)
        return n + sum(remove_if_stale(p) for p in self.root.glob(".build.toml.*.tmp"))

    @property
    def locked(self) -> bool:
        """Whether this object holds the build's lock."""
        return self._lock is not None and self._lock.held

    def release(self) -> None:
        """Release the build's lock (held since :meth:`create_or_resume`); again: nothing."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    close = release

    def __enter__(self) -> BuildDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

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

    def done_keys(self, stage: str) -> set[str]:
        """The work keys of ``stage`` the ledger holds, from one listing of its folder (a resumed build
        skips them before submitting anything: about a microsecond a key against tens for :meth:`done`)."""
        try:
            with os.scandir(self.state_dir / stage) as it:
                return {e.name[:-5] for e in it if e.name.endswith(".json")}
        except FileNotFoundError:
            return set()

    def mark_done(self, stage: str, work_key: str, record: dict[str, Any]) -> None:
        crash_point("ledger.before")
        crash_point(f"ledger.before.{stage}")
        atomic_write_bytes(self._ledger_path(stage, work_key), strict_json(record, sort_keys=True).encode())

    def ledger(self, stage: str) -> list[dict[str, Any]]:
        folder = self.state_dir / stage
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []

    def retract(self, keys: dict[str, str], run_id: str) -> dict[str, int]:
        """Move the work of one unit (``keys``: stage -> work key) out of the build, nothing deleted:
        every table part whose footer carries one of the keys, and each stage's ledger entry, go to
        ``retracted/<run_id>/`` under the same relative paths. Returns the parts and entries moved per
        table / ``state``."""
        wanted = set(keys.values())
        dest = self.root / "retracted" / run_id
        moved: dict[str, int] = {}
        for table_dir in sorted(p for p in self.tables_dir.glob("*") if p.is_dir()):
            table = table_dir.name
            for part, key in self.reader.work_keys(table).items():
                if key in wanted and part.exists():
                    target = dest / "tables" / table / part.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    part.replace(target)
                    moved[table] = moved.get(table, 0) + 1
        for stage, key in keys.items():
            entry = self._ledger_path(stage, key)
            if entry.exists():
                target = dest / "state" / stage / entry.name
                target.parent.mkdir(parents=True, exist_ok=True)
                entry.replace(target)
                moved["state"] = moved.get("state", 0) + 1
        self.reader.forget()
        return moved

    # -- provenance ----------------------------------------------------------------------------
    def write_run(self, run_id: str, payload: dict[str, Any]) -> Path:
        """``runs/<run_id>.json``: strict JSON (a NaN or an infinity, say an AUROC of no negatives, is null)."""
        path = self.runs_dir / f"{run_id}.json"
        atomic_write_bytes(path, strict_json(payload, indent=2, sort_keys=True, default=str).encode())
        return path

    def runs(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.runs_dir.glob("*.json"))]
