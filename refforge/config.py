"""Build configuration: TOML -> pydantic, strict about every key, stage and backend.

A config names the source, the stages to run and each stage's backend and parameters. Any unknown
key, stage, source kind or backend fails before any work, with the allowed values in the message.
The sections are the stages' own: :func:`config_model` assembles the Config model from the registry
(``[build]``, each stage's section in pipeline order, ``[llm]``, ``[vlm]``, ``[runner]``), so a stage's
section is defined once, in the stage's module. The config hash (sha256 of the canonical JSON of
everything that changes the data, i.e. all but the ``[runner]`` section and where models are served)
identifies a build: an existing build directory with another hash is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import tomli_w
from pydantic import BaseModel, Field, ValidationError, create_model, field_validator, model_validator

from refforge._strict import ConfigError, _Strict
from refforge.flows.registry import REGISTRY, by_name, sections, unit_stages
from refforge.llm.endpoint import OPERATIONAL_ENDPOINT_KEYS, UNSET_ENDPOINT_KEYS, ModelEndpoint
from refforge.pipeline.stage import GlobalStage, Stage
from refforge.stages.ingest import SOURCE_KINDS


class _BuildSection(_Strict):
    name: str = Field(default="refforge-build", description=(
        "the build's name: the default build folder is builds/<name>, so a plain name (letters, digits, "
        "'.', '-', '_')"))
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    shard_size: int = Field(default=40, ge=1, le=100_000,
                            description="images per unit of work (one Prefect task per shard and stage)")
    stages: list[str] | None = None  # narrowed to the registry's stage names by config_model()
    removed_items: Literal["keep", "retract"] = Field(default="keep", description=(
        "source items that disappeared since an earlier run of this build: 'keep' their rows (counted in the run "
        "record) or 'retract' them (their shards are remade without them; the old rows are moved to "
        "<build>/retracted/). Not part of the config hash: a decision about the source, not the recipe"))

    stage_order: ClassVar[tuple[str, ...]] = ()
    stage_requires: ClassVar[dict[str, tuple[str, ...]]] = {}

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        plain = v not in ("", ".", "..") and all(c.isascii() and (c.isalnum() or c in "._-") for c in v)
        if not plain:
            raise ValueError(f"{v!r} is not a plain name: use letters, digits, '.', '-' and '_' only (no '/', "
                             "'\\', absolute path, '.' or '..'): the build goes to builds/<name>")
        return v

    @model_validator(mode="after")
    def _order(self):
        if self.stages is None:
            return self  # completed by Config._default_stages, which sees the whole config
        self.stages = list(dict.fromkeys(self.stages))
        first = self.stage_order[0]
        if first not in self.stages:
            raise ValueError(f"stages must include {first!r} (every build starts from a source)")
        for stage in self.stages:
            missing = [r for r in self.stage_requires.get(stage, ()) if r not in self.stages]
            if missing:
                raise ValueError(f"stage '{stage}' needs {', '.join(repr(m) for m in missing)} in stages")
        self.stages = [s for s in self.stage_order if s in self.stages]
        return self


# The process runner pays on 2 cores once a build has enough units to keep both workers busy: its pool
# starts in about 1.5 s (the forkserver's imports), so at 3 shards it is even with threads (120 scenes:
# 0.97x), at 6 shards 1.18x faster (the demo's 240 scenes), 1.37x at 25 (1,000 scenes) and 1.50x at 100
# (4,000 scenes; benchmarks/RESULTS.md, issue 18).
AUTO_PROCESS_MIN_UNITS = 6

# The process runner's Prefect task runs carry several shards each (every shard is still its own unit,
# ledger entry and pool job): a task run costs the build's process ~7 ms and the Prefect server ~23 ms
# of CPU, and on a machine whose cores the workers keep busy that CPU is taken from the units (4,000
# scenes, 600 task runs: the server alone used 13-15 CPU s). See benchmarks/RESULTS.md, issue 18.
TASKS_PER_THREAD = 4
MAX_SHARDS_PER_TASK = 16


class RunnerSection(_Strict):
    kind: Literal["auto", "thread", "process", "dask"] = Field(default="auto", description=(
        "auto: the process runner for builds of several shards on two or more cores, else threads"))
    workers: int = Field(default=2, ge=1, le=1024)
    address: str | None = Field(default=None, description="dask: tcp://host:port of an existing scheduler")
    gpu_workers: int | None = Field(default=None, ge=0, le=1024,
                                    description="dask, local cluster: workers started with the GPU=1 resource")
    endpoint_limits: bool | None = Field(default=None, description=(
        "hold a Prefect global concurrency limit per model endpoint around each request (default: on for dask)"))
    shards_per_task: int | None = Field(default=None, ge=1, le=1024, description=(
        "process runner: shards per Prefect task run (each shard still its own unit in the pool); "
        "default: about four task runs per task thread and stage, at most 16 shards each"))

    @model_validator(mode="after")
    def _dask_only(self):
        if self.kind != "dask" and (self.address is not None or self.gpu_workers is not None):
            raise ValueError("runner.address and runner.gpu_workers are for kind = 'dask'")
        if self.address is not None and not self.address.startswith(("tcp://", "tls://", "ucx://", "inproc://")):
            raise ValueError(f"runner.address must be tcp://host:port (a Dask scheduler), not {self.address!r}")
        return self

    @property
    def limits_endpoints(self) -> bool:
        return self.kind == "dask" if self.endpoint_limits is None else self.endpoint_limits

    def task_shards(self, todo: int, task_threads: int) -> int:
        """Shards per Prefect task run for ``todo`` shards of a stage on the process runner:
        ``shards_per_task``, or about :data:`TASKS_PER_THREAD` task runs per task thread, at most
        :data:`MAX_SHARDS_PER_TASK` shards each (never fewer than one)."""
        if self.shards_per_task is not None:
            return self.shards_per_task
        return max(1, min(MAX_SHARDS_PER_TASK, -(-todo // (task_threads * TASKS_PER_THREAD))))

    def resolved(self, shards: int) -> str:
        """The runner a build of ``shards`` shards runs with: ``kind``, or for ``"auto"`` the process
        runner when the machine has at least two usable cores, ``workers >= 2`` and the plan at least
        :data:`AUTO_PROCESS_MIN_UNITS` shards; else the thread runner."""
        if self.kind != "auto":
            return self.kind
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return "process" if cores >= 2 and self.workers >= 2 and shards >= AUTO_PROCESS_MIN_UNITS else "thread"


class ConfigBase(_Strict):
    """The parts of a build config that no stage owns; the stages' sections come from the registry
    (:func:`config_model`)."""

    registry: ClassVar[list[Stage]] = []

    @model_validator(mode="before")
    @classmethod
    def _default_source_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("source"), dict) and "kind" not in data["source"]:
            data = {**data, "source": {"kind": "synthetic", **data["source"]}}
        return data

    @model_validator(mode="after")
    def _default_stages(self):
        if self.build.stages is None:
            self.build.stages = [s.name for s in unit_stages(self.registry) if s.auto(self)]
        return self

    @model_validator(mode="after")
    def _cross_checks(self):
        """Each section's checks against the rest of the config (the endpoints its backend needs...)."""
        for name in sections(self.registry):
            check = getattr(getattr(self, name), "check_against", None)
            if check is not None:
                check(self)
        return self

    # -- identity --------------------------------------------------------------------------------
    def stage(self, name: str) -> Stage:
        return by_name(self.registry)[name]

    def running(self) -> list[Stage]:
        """The registry's stages this config runs, in pipeline order (a global step with its stage)."""
        chosen = set(self.build.stages)
        return [s for s in self.registry
                if s.name in chosen or (isinstance(s, GlobalStage) and s.part_of in chosen)]

    def preflight(self) -> None:
        """What the stages can check before anything is written (source files and folders, local model
        paths): one ConfigError naming every problem."""
        problems = [p for s in self.running() for p in s.preflight(self)]
        if problems:
            raise ConfigError("; ".join(dict.fromkeys(problems)))

    def unused_sections(self) -> list[str]:
        """One line per section the config sets that no stage of this build uses: a stage's section
        when the stage does not run (and no running stage reads it through ``uses``), an ``[llm]`` or
        ``[vlm]`` endpoint that no running stage's settings call (a stage that declares the endpoint in
        ``endpoints`` uses it only where one of the sections it reads needs it, e.g. ``cot.backend =
        'vlm'``). A warning, not an error: such a section changes nothing, and a config shared between
        builds may hold it on purpose."""
        running = self.running()
        used = {"build", "runner"} | {s.section_name for s in running if s.section_name}
        used |= {u for s in running for u in s.uses}
        out = []
        for name in sorted(self.model_fields_set, key=list(type(self).model_fields).index):
            if name in ("llm", "vlm"):
                if getattr(self, name) is not None and not self._endpoint_needed(name, running):
                    callers = [s.name for s in running if name in s.endpoints]
                    hint = (f"the running stages that can call it ({', '.join(callers)}) do not with this config"
                            if callers else "no running stage calls it")
                    out.append(f"[{name}] is set but unused: {hint}; remove it or set a backend that uses it")
            elif name not in used:
                out.append(f"[{name}] is set but no stage of this build uses it (stages: "
                           f"{', '.join(self.build.stages)}); add its stage to [build] stages or remove it")
        return out

    def endpoints_needed(self) -> list[str]:
        """The model endpoints ("llm", "vlm") a running stage's settings call."""
        running = self.running()
        return [w for w in ("llm", "vlm") if getattr(self, w) is not None and self._endpoint_needed(w, running)]

    def _endpoint_needed(self, which: str, running: list[Stage]) -> bool:
        """Whether a running stage's settings need endpoint ``which``: a check of a section it reads fails
        without it."""
        without = self.model_copy(update={which: None})
        for s in running:
            if which not in s.endpoints:
                continue
            for sec in (s.section_name, *s.uses):
                check = getattr(getattr(self, sec, None), "check_against", None) if sec else None
                if check is None:
                    continue
                try:
                    check(without)
                except ValueError:
                    return True
        return False

    def section_of(self, stage: Stage) -> Any:
        """The config section a stage runs with (its own, or its parent's for a global step), or None."""
        return getattr(self, stage.section_name) if stage.section_name else None

    def data_dict(self) -> dict[str, Any]:
        """Everything that changes the data (the runner and where models are served do not), with the
        stage code versions."""
        d = self.model_dump(mode="json", exclude={"runner"})
        d["build"].pop("removed_items", None)  # what to do with vanished source items: not the recipe
        stages = self.build.stages
        # sections that cannot change this build's data are left out, so adding a stage to refforge does
        # not change the hash (and the identity) of existing builds that do not use it
        for s in unit_stages(self.registry):
            if not s.core and s.name not in stages and s.section_name:
                d.pop(s.section_name, None)
        for name in sections(self.registry):
            in_data = getattr(getattr(self, name), "in_data", None)
            if in_data is not None and not in_data():
                d.pop(name, None)
            # a section whose new fields only count once used (negatives_image's edits)
            hash_data = getattr(getattr(self, name), "hash_data", None)
            if hash_data is not None and name in d:
                d[name] = hash_data(d[name])
        for name in ("llm", "vlm"):
            if d.get(name):
                d[name] = {k: v for k, v in d[name].items() if k not in OPERATIONAL_ENDPOINT_KEYS
                           and not (k in UNSET_ENDPOINT_KEYS and v is None)}
        versions = {s: self.stage(s).version for s in stages}
        # a global step's version is recorded once it is bumped (builds from before it had one keep their hash)
        versions.update({g.name: g.version for g in self.registry
                         if isinstance(g, GlobalStage) and g.part_of in stages and g.version != 1})
        d["stage_versions"] = versions
        return d

    def config_hash(self) -> str:
        blob = json.dumps(self.data_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def stage_hash(self, stage: str) -> str:
        """Hash of what one stage's output depends on: the source, the seed, the shard size, the stage's
        own section and version, and what it declares in ``hash_depends`` (:meth:`Stage.hash_extra`)."""
        s = self.stage(stage)
        d = self.data_dict()
        part = {"source": d["source"], "seed": d["build"]["seed"], "shard_size": d["build"]["shard_size"],
                "stage": d.get(s.section_name, {}) if s.section_name else {}, "version": s.version}
        part.update(s.hash_extra(d))
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


def _default_factory(model: Any):
    """A section's default: the model itself, or the first member of a union (``[source]``: synthetic)."""
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model
    union = get_args(model)[0] if get_args(model) else model
    return get_args(union)[0]


def config_model(registry: list[Stage]) -> type[ConfigBase]:
    """The config model of a registry: ``[build]``, the stages' sections in pipeline order, ``[llm]``,
    ``[vlm]`` and ``[runner]``."""
    names = tuple(s.name for s in unit_stages(registry))
    build = create_model(
        "BuildSection", __base__=_BuildSection, __module__=__name__,
        stages=(list[Literal[names]] | None, Field(default=None, validate_default=False, description=(  # type: ignore[valid-type]
            "default: the stages whose auto() says so (the default ones, plus proposals/describe where the "
            "config needs them)"))))
    build.stage_order = names
    build.stage_requires = {s.name: s.requires for s in unit_stages(registry) if s.requires}
    fields: dict[str, Any] = {"build": (build, Field(default_factory=build))}
    for name, model in sections(registry).items():
        fields[name] = (model, Field(default_factory=_default_factory(model)))
    fields["llm"] = (ModelEndpoint | None, None)
    fields["vlm"] = (ModelEndpoint | None, None)
    fields["runner"] = (RunnerSection, Field(default_factory=RunnerSection))
    model = create_model("Config", __base__=ConfigBase, __module__=__name__, **fields)
    model.registry = list(registry)
    return model


Config = config_model(REGISTRY)
BuildSection = Config.model_fields["build"].annotation


def _allowed_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """Walk the model along ``loc`` (minus the last element) and list the fields allowed there."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            ann = current.model_fields[part].annotation
            args = getattr(ann, "__args__", ())
            current = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        elif part in SOURCE_KINDS:
            current = SOURCE_KINDS[part]
        else:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _format(err: ValidationError, origin: str, model: type[BaseModel]) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc if p not in SOURCE_KINDS) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_fields(model, loc)
            lines.append(f"  unknown key '{where}'; allowed keys here: {', '.join(allowed)}")
        elif kind == "literal_error":
            expected = e.get("ctx", {}).get("expected", "")
            what = ("stage" if "stages" in loc else "backend" if loc[-1] in ("backend", "detector", "tagger", "ground")
                    else "value")
            lines.append(f"  {where}: unknown {what} {e['input']!r}; allowed: {expected}")
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            lines.append(f"  {where}.kind: unknown source kind {e.get('ctx', {}).get('tag', '')!r}; "
                         f"allowed: {e.get('ctx', {}).get('expected_tags', ', '.join(SOURCE_KINDS))}")
        else:
            lines.append(f"  {where}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], origin: str = "<dict>", model: type[ConfigBase] | None = None) -> Config:
    model = model or Config
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, origin, model)) from None


def load_config(path: str | Path | None = None) -> Config:
    """Load a TOML config; ``None`` loads the embedded default (configs/demo.toml)."""
    if path is None:
        text = resources.files("refforge.configs").joinpath("demo.toml").read_text()
        origin = "demo.toml (embedded default)"
    else:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        origin = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config {origin} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"config {origin} cannot be read: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {origin} is not valid TOML: {e}") from None
    cfg = parse_config(data, origin)
    if path is not None:
        base = Path(path).parent
        src = cfg.source
        update = {name: base / value for name, value in src if isinstance(value, Path) and not value.is_absolute()}
        cfg.source = src.model_copy(update=update)
    return cfg
