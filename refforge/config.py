"""Build configuration: TOML -> pydantic, strict about every key, stage and backend.

A config names the source, the stages to run and each stage's backend and parameters. Any unknown
key, stage, source kind or backend fails before any work, with the allowed values in the message.
The config hash (sha256 of the canonical JSON of everything that changes the data, i.e. all but the
``[runner]`` section) identifies a build: an existing build directory with another hash is refused.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

STAGES: tuple[str, ...] = ("ingest", "proposals", "paths", "describe", "negatives_text", "negatives_image", "cot")
StageName = Literal["ingest", "proposals", "paths", "describe", "negatives_text", "negatives_image", "cot"]
REQUIRES: dict[str, tuple[str, ...]] = {
    "proposals": ("ingest",), "paths": ("ingest",), "describe": ("proposals",), "negatives_text": ("paths",),
    "negatives_image": ("paths",), "cot": ("paths",),
}
# what ``[build] stages`` is when a config does not list them; "proposals" is added for a folder source
# (or ``[proposals] all_images = true``) and "describe" when ``[describe] backend`` is not offline
DEFAULT_STAGES: tuple[str, ...] = ("ingest", "paths", "negatives_text", "negatives_image", "cot")

# Bump a stage's version when its code changes what it writes: the version is part of the config hash
# and of the stage's work keys, so an old build is not silently mixed with the new stage's output.
STAGE_VERSIONS: dict[str, int] = {"ingest": 1, "proposals": 1, "paths": 2, "describe": 1, "negatives_text": 1,
                                  "negatives_image": 1, "cot": 1}


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the allowed values."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BuildSection(_Strict):
    name: str = "refforge-build"
    seed: int = 0
    shard_size: int = Field(default=40, ge=1, le=100_000,
                            description="images per unit of work (one Prefect task per shard and stage)")
    stages: list[StageName] = Field(default=None, validate_default=False, description=(  # type: ignore[assignment]
        "default: DEFAULT_STAGES, plus proposals/describe where the config needs them (Config._default_stages)"))

    @model_validator(mode="after")
    def _order(self):
        if self.stages is None:
            return self  # completed by Config._default_stages, which sees the whole config
        self.stages = list(dict.fromkeys(self.stages))
        if "ingest" not in self.stages:
            raise ValueError("stages must include 'ingest' (every build starts from a source)")
        for stage in self.stages:
            missing = [r for r in REQUIRES.get(stage, ()) if r not in self.stages]
            if missing:
                raise ValueError(f"stage '{stage}' needs {', '.join(repr(m) for m in missing)} in stages")
        self.stages = [s for s in STAGES if s in self.stages]
        return self


class SyntheticSource(_Strict):
    """Rendered scenes with exact scene graphs, deterministic by seed (offline)."""

    kind: Literal["synthetic"] = "synthetic"
    images: int = Field(default=240, ge=1)
    width: int = Field(default=512, ge=64)
    height: int = Field(default=384, ge=64)
    min_objects: int = Field(default=3, ge=1)
    max_objects: int = Field(default=12, ge=1)

    @model_validator(mode="after")
    def _range(self):
        if self.min_objects > self.max_objects:
            raise ValueError("min_objects must be <= max_objects")
        return self


class GraphsSource(_Strict):
    """refforge's own scene-graph format: a JSON list (or JSON Lines) of
    ``{"image": path, "objects": [{"id", "name", "attributes", "box"}], "relations": [{"subject",
    "predicate", "object"}]}`` with image paths relative to ``images_dir``."""

    kind: Literal["graphs"] = "graphs"
    path: Path
    images_dir: Path
    relations_from_geometry: bool = False


class GqaSource(_Strict):
    """GQA scene graphs (``train_sceneGraphs.json`` / ``val_sceneGraphs.json``) plus the image folder."""

    kind: Literal["gqa"] = "gqa"
    scene_graphs: Path
    images_dir: Path
    image_ext: str = ".jpg"


class CocoSource(_Strict):
    """COCO instances (relations from geometry), optionally with RefCOCO/RefCOCO+/RefCOCOg refs."""

    kind: Literal["coco"] = "coco"
    instances: Path
    images_dir: Path
    refs: Path | None = None


class FolderSource(_Strict):
    """A folder of images, searched recursively; no objects (the proposals stage finds them)."""

    kind: Literal["folder"] = "folder"
    path: Path
    extensions: list[str] = Field(default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp"])
    recursive: bool = True

    @model_validator(mode="after")
    def _exts(self):
        self.extensions = sorted({e.lower() if e.startswith(".") else f".{e.lower()}" for e in self.extensions})
        if not self.extensions:
            raise ValueError("extensions must name at least one file extension")
        return self


Source = Annotated[SyntheticSource | GraphsSource | GqaSource | CocoSource | FolderSource,
                   Field(discriminator="kind")]
SOURCE_KINDS = {"synthetic": SyntheticSource, "graphs": GraphsSource, "gqa": GqaSource, "coco": CocoSource,
                "folder": FolderSource}

DEFAULT_BLOCKLIST = ["sky", "wall", "ground", "floor", "ceiling", "road", "grass", "water", "field", "sand",
                     "snow", "street", "sidewalk", "background"]


class PathsStage(_Strict):
    backend: Literal["offline"] = "offline"
    max_hops: int = Field(default=2, ge=0, le=2)
    max_constraints: int = Field(default=3, ge=1, le=4)
    max_per_target: int = Field(default=3, ge=1)
    positions: bool = True
    min_area_frac: float = Field(default=0.001, ge=0, le=1)
    max_area_frac: float = Field(default=0.8, gt=0, le=1)
    blocklist: list[str] = Field(default_factory=lambda: list(DEFAULT_BLOCKLIST))
    drop_border_cut: bool = True
    taxonomy: Literal["refbench_pro", "groundingme"] = "refbench_pro"
    descriptive_share: float = Field(default=0.5, ge=0, le=1, description=(
        "share of relation paths that also get a descriptive positive (an attribute on both ends of a "
        "relation; what attribute-swap negatives need)"))


# where and how fast a model is served does not change the data: left out of the config hash
OPERATIONAL_ENDPOINT_KEYS = ("base_url", "api_key_env", "concurrency", "timeout_s", "max_retries",
                             "price_per_1k_input", "price_per_1k_output")


class ModelEndpoint(_Strict):
    """An OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, Ollama, LM Studio, Gemini/Qwen compatible
    modes). The API key is read from the environment variable named by ``api_key_env`` at run time."""

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = Field(default=8, ge=1)
    timeout_s: float = Field(default=60, gt=0)
    max_retries: int = Field(default=5, ge=0)
    image_longest_side: int = Field(default=1024, ge=32)
    structured_output: Literal["auto", "json_schema", "instructions"] = "auto"
    price_per_1k_input: float | None = None
    price_per_1k_output: float | None = None


class RewriteStage(_Strict):
    """Template expressions -> natural language by an LLM (``[llm]``), checked against each expression's
    own path; ``offline`` keeps the template text."""

    backend: Literal["offline", "llm"] = "offline"
    temperature: float = Field(default=0.7, ge=0)


class ProposalsStage(_Strict):
    """Object proposals for images without complete scene graphs: tagger -> detector -> NMS rule
    (``refforge.stages.proposals``). The fields from ``box_threshold`` on are ``ProposalParams``."""

    detector: Literal["offline", "grounding_dino"] = "offline"
    detector_model: str | None = None
    tagger: Literal["none", "vocabulary", "open_clip"] = "none"
    tagger_model: str | None = None
    tagger_pretrained: str | None = None
    vocabulary: list[str] | None = None
    all_images: bool = False
    device: str = "cpu"
    batch_size: int = Field(default=4, ge=1)
    box_threshold: float = Field(default=0.35, ge=0, le=1)
    text_threshold: float = Field(default=0.25, ge=0, le=1)
    max_tags: int = Field(default=20, ge=1)
    tag_threshold: float = Field(default=0.0, ge=0, le=1)
    nms_iou: float = Field(default=0.5, ge=0, le=1)
    nms_ios: float = Field(default=0.8, ge=0, le=1)
    min_area_frac: float = Field(default=0.001, ge=0, le=1)
    max_area_frac: float = Field(default=0.95, gt=0, le=1)
    max_per_image: int = Field(default=50, ge=1)
    class_agnostic: bool = False
    relations_from_geometry: bool = True

    @model_validator(mode="after")
    def _models(self):
        if self.detector == "grounding_dino" and not self.detector_model:
            raise ValueError("detector = 'grounding_dino' needs detector_model (a local path or a hub id)")
        if self.tagger == "open_clip" and not self.tagger_model:
            raise ValueError("tagger = 'open_clip' needs tagger_model (an open_clip model name)")
        if self.tagger in ("vocabulary", "open_clip") and not self.vocabulary:
            raise ValueError(f"tagger = {self.tagger!r} needs a vocabulary (a list of category names)")
        if self.detector == "grounding_dino" and self.tagger == "none" and not self.vocabulary:
            raise ValueError("detector = 'grounding_dino' needs words to look for: a tagger or a vocabulary")
        return self


class DescribeStage(_Strict):
    """Set-of-Mark descriptions of proposal boxes by a VLM (``[vlm]``), one per task category, kept when
    grounding the description again finds the box (IoU >= ``iou``); ``offline`` writes nothing."""

    backend: Literal["offline", "vlm"] = "offline"
    tasks: list[str] = Field(default_factory=lambda: ["attribute", "position", "relation"])
    ground: Literal["vlm"] = "vlm"
    ground_dialect: Literal["pixels", "grid1000"] = "pixels"
    iou: float = Field(default=0.5, gt=0, le=1)
    max_boxes: int = Field(default=20, ge=1, description="proposal boxes described per image (highest score)")
    temperature: float = Field(default=0, ge=0)


class NegativesTextStage(_Strict):
    backend: Literal["offline", "llm"] = "offline"
    per_type: int = Field(default=1, ge=1, description="candidates per (type, level) and positive")
    refine: bool = True
    target_auroc: float = Field(default=0.6, gt=0.5, le=1.0)
    max_rounds: int = Field(default=5, ge=1)


class NegativesImageStage(_Strict):
    flip: bool = True


class CotStage(_Strict):
    backend: Literal["offline", "vlm"] = "offline"
    k: int = Field(default=1, ge=1, le=16)
    judge: Literal["rule", "llm"] = "rule"
    dialect: Literal["pixels", "grid1000", "pairs", "qwen_json"] = "pixels"
    temperature: float = Field(default=0.8, ge=0)


class RunnerSection(_Strict):
    kind: Literal["thread", "process", "dask"] = "thread"
    workers: int = Field(default=2, ge=1)


class Config(_Strict):
    build: BuildSection = Field(default_factory=BuildSection)
    source: Source = Field(default_factory=SyntheticSource)
    proposals: ProposalsStage = Field(default_factory=ProposalsStage)
    paths: PathsStage = Field(default_factory=PathsStage)
    rewrite: RewriteStage = Field(default_factory=RewriteStage)
    describe: DescribeStage = Field(default_factory=DescribeStage)
    negatives_text: NegativesTextStage = Field(default_factory=NegativesTextStage)
    negatives_image: NegativesImageStage = Field(default_factory=NegativesImageStage)
    cot: CotStage = Field(default_factory=CotStage)
    llm: ModelEndpoint | None = None
    vlm: ModelEndpoint | None = None
    runner: RunnerSection = Field(default_factory=RunnerSection)

    @model_validator(mode="before")
    @classmethod
    def _default_source_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("source"), dict) and "kind" not in data["source"]:
            data = {**data, "source": {"kind": "synthetic", **data["source"]}}
        return data

    @model_validator(mode="after")
    def _default_stages(self):
        if self.build.stages is None:
            extra = []
            if isinstance(self.source, FolderSource) or self.proposals.all_images:
                extra.append("proposals")
                if self.describe.backend != "offline":
                    extra.append("describe")
            self.build.stages = [s for s in STAGES if s in (*DEFAULT_STAGES, *extra)]
        return self

    @model_validator(mode="after")
    def _endpoints(self):
        if self.rewrite.backend == "llm" and self.llm is None:
            raise ValueError("rewrite.backend = 'llm' needs an [llm] section (base_url, model)")
        if self.describe.backend == "vlm" and self.vlm is None:
            raise ValueError("describe.backend = 'vlm' needs a [vlm] section (base_url, model)")
        if self.describe.backend == "vlm":
            from refforge.stages.taxonomy import GROUNDINGME_LABELS, REFBENCH_PRO_LABELS

            labels = {"refbench_pro": REFBENCH_PRO_LABELS, "groundingme": GROUNDINGME_LABELS}[self.paths.taxonomy]
            allowed = [t for t in labels if not t.startswith(("reject", "rejection"))]
            bad = [t for t in self.describe.tasks if t not in allowed]
            if bad or not self.describe.tasks:
                raise ValueError(f"describe.tasks: unknown task {', '.join(map(repr, bad)) or '(none given)'} for "
                                 f"the {self.paths.taxonomy} taxonomy; allowed: {', '.join(allowed)}")
        if self.negatives_text.backend == "llm" and self.llm is None:
            raise ValueError("negatives_text.backend = 'llm' needs an [llm] section (base_url, model)")
        if self.cot.backend == "vlm" and self.vlm is None:
            raise ValueError("cot.backend = 'vlm' needs a [vlm] section (base_url, model)")
        if self.cot.judge == "llm" and self.llm is None:
            raise ValueError("cot.judge = 'llm' needs an [llm] section (base_url, model)")
        return self

    def data_dict(self) -> dict[str, Any]:
        """Everything that changes the data (the runner and where models are served do not), with the
        stage code versions."""
        d = self.model_dump(mode="json", exclude={"runner"})
        # sections that cannot change this build's data are left out, so adding a stage to refforge does
        # not change the hash (and the identity) of existing builds that do not use it
        for name in ("proposals", "describe"):
            if name not in self.build.stages:
                d.pop(name)
        if self.rewrite.backend == "offline":
            d.pop("rewrite")
        for name in ("llm", "vlm"):
            if d.get(name):
                d[name] = {k: v for k, v in d[name].items() if k not in OPERATIONAL_ENDPOINT_KEYS}
        d["stage_versions"] = {s: STAGE_VERSIONS[s] for s in self.build.stages}
        return d

    def config_hash(self) -> str:
        blob = json.dumps(self.data_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def stage_hash(self, stage: str) -> str:
        """Hash of what one stage's output depends on: the source, the seed and the stage's own section."""
        d = self.data_dict()
        part = {"source": d["source"], "seed": d["build"]["seed"], "shard_size": d["build"]["shard_size"],
                "stage": d.get(stage, {}), "version": STAGE_VERSIONS[stage]}
        # the stages that write expressions rewrite them with the LLM before they write them
        if stage in ("paths", "negatives_text") and "rewrite" in d:
            part["rewrite"] = {**d["rewrite"], "llm": d.get("llm")}
        if stage == "describe" and self.describe.backend != "offline":
            part["vlm"] = d.get("vlm")
            part["taxonomy"] = d["paths"]["taxonomy"]
        return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


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


def _format(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc if p not in SOURCE_KINDS) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_fields(Config, loc)
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


def parse_config(data: dict[str, Any], origin: str = "<dict>") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, origin)) from None


def load_config(path: str | Path | None = None) -> Config:
    """Load a TOML config; ``None`` loads the embedded default (configs/demo.toml)."""
    if path is None:
        text = resources.files("refforge.configs").joinpath("demo.toml").read_text()
        origin = "demo.toml (embedded default)"
    else:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        text, origin = p.read_text(), str(p)
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
