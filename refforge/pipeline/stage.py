"""What a build stage is: one class that declares, in one place, everything the runner needs.

A stage is a subclass of :class:`Stage` (one unit of work per shard of images) or of
:class:`GlobalStage` (one step over the whole build, such as the blind-text refinement), defined in
the module or package of the stage's own name under ``stages/`` and listed once in
:data:`refforge.flows.registry.REGISTRY`. The planner, the runner, the config and the run record
read these declarations and know no stage by name.

Declarations (class attributes):

``name``          the stage's name: in ``[build] stages``, in work keys, in ``state/<name>/`` and in
                  the run file
``version``       bump it when the stage's output changes: it enters the stage's work keys and the
                  config hash, so an old build is not silently mixed with new output
``config``        the pydantic model of the stage's ``[<name>]`` section (the one definition of its
                  defaults); None when the stage has no section of its own
``uses``          other config sections the stage reads, name -> model (``{"rewrite": RewriteConfig}``);
                  :meth:`BuildContext.section` hands out only these
``endpoints``     model endpoints the stage may call (``"llm"``, ``"vlm"``): :meth:`BuildContext.client`
``requires``      the stages that must run before it (checked when a config is read)
``reads``         tables it reads; ``writes``: tables it writes (checked against what run() returns)
``hash_depends``  other config sections (or ``section.field``) its work keys depend on; what run()
                  reads of another section through an upstream work key needs no entry
``packages``      optional packages ``(module, extra)`` it needs whatever its backend;
                  :meth:`needed_packages` adds backend-dependent ones. Checked before any unit runs.
``key_inputs``    the names in a shard's plan whose values make its work key (after the stage name
                  and hash); a list value is spliced in
``joins``         the list in a shard's plan its key is appended to (``"graph"``: the keys whose tables
                  make the shard's scene graphs; ``"described"``: keys of described expressions)
``core``          True for the stages of the first release: their keys are planned and their sections
                  hashed even when a config leaves them out (downstream keys always named them). A
                  stage added later keeps the default False: it changes nothing for builds without it.
``default``       in the stage list of a config that does not name its stages

Behaviour (methods): :meth:`run` over one unit, :meth:`summary` of the units' ``extra`` for the run
file, :meth:`model_ids` for provenance, :meth:`auto` (whether a config that names no stages gets it),
:meth:`hash_extra` (the default builds it from ``hash_depends``), :meth:`prompts` (prompt templates
it sends, for provenance).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

from refforge.optional import check_packages
from refforge.schemas import Drop, Record

if TYPE_CHECKING:  # the context imports this module
    from .context import StageContext


@dataclass
class UnitOutput:
    """What one unit of work made: rows per table, drops, how many items it read, and counts for the
    stage's summary (``extra``)."""

    tables: dict[str, list[Record]] = field(default_factory=dict)
    drops: list[Drop] = field(default_factory=list)
    items_in: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Stage:
    """One unit of work per shard. Subclasses set the class attributes above and implement run()."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    config: ClassVar[type[BaseModel] | None] = None
    uses: ClassVar[dict[str, Any]] = {}
    endpoints: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    hash_depends: ClassVar[tuple[str, ...]] = ()
    packages: ClassVar[tuple[tuple[str, str], ...]] = ()
    key_inputs: ClassVar[tuple[str, ...]] = ()
    joins: ClassVar[str | None] = None
    core: ClassVar[bool] = False
    default: ClassVar[bool] = False

    # -- config ------------------------------------------------------------------------------
    @property
    def section_name(self) -> str | None:
        """The config section that is the stage's own (its name), or None."""
        return self.name if self.config is not None else None

    def auto(self, cfg: Any) -> bool:
        """Whether a config that does not list its stages runs this one (default: ``default``)."""
        return self.default

    def preflight(self, cfg: Any) -> list[str]:
        """Problems a run would hit that can be seen before anything is written (missing source files,
        a local model path that is not there); each one short line. Default: none."""
        return []

    def needed_packages(self, section: Any) -> list[tuple[str, str]]:
        """Optional packages this stage needs with this section's backends."""
        return list(self.packages)

    def check_packages(self, section: Any) -> None:
        """Fail before any work when a package the stage needs is missing (names the install command)."""
        check_packages(self.needed_packages(section), f"stage {self.name!r}")

    def hash_extra(self, data: dict[str, Any]) -> dict[str, Any]:
        """What of the other sections enters the stage's hash, from the config's data dict (see
        ``Config.data_dict``). The default takes each ``hash_depends`` entry that the data holds."""
        out = {}
        for dep in self.hash_depends:
            value: Any = data
            for part in dep.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                out[dep.split(".")[-1]] = value
        return out

    # -- work --------------------------------------------------------------------------------
    def prepare(self, ctx: StageContext) -> None:
        """Once per run, before the units are planned (the source stage converts and lists its files)."""

    def inputs(self, shard: dict[str, Any]) -> dict[str, Any]:
        """The unit's inputs from its shard's plan (every key of the plan, by default)."""
        return shard

    def run(self, ctx: StageContext, section: Any, inputs: dict[str, Any]) -> UnitOutput:
        raise NotImplementedError

    # -- provenance --------------------------------------------------------------------------
    def summary(self, extras: list[dict[str, Any]]) -> dict[str, Any]:
        """The stage's own lines of the run file, from its units' ``extra`` (default: none)."""
        return {}

    def model_ids(self, ctx: StageContext, section: Any) -> dict[str, str]:
        """What made the output, by name (a model id, or the offline algorithm's name)."""
        return {}

    def prompts(self, ctx: StageContext, section: Any) -> tuple[str, ...]:
        """Names of the prompt templates (prompts/llm/<name>.j2) this stage sends with this config."""
        return ()


class GlobalStage(Stage):
    """A step that needs the whole build at once (one task), then commits per shard like the rest.

    ``part_of`` names the unit stage it belongs to: it runs right after that stage, when that stage
    runs, reading that stage's config section."""

    part_of: ClassVar[str]

    @property
    def section_name(self) -> str | None:
        return self.part_of

    def run_all(self, ctx: StageContext, section: Any, units: list[dict[str, Any]]) -> dict[str, UnitOutput]:
        """One output per unit (by its ``key``)."""
        raise NotImplementedError

    def block_shards(self, section: Any, shard_size: int) -> int | None:
        """How many consecutive shards one run of the step takes (its fit sees only them; each block is
        its own task, so memory and time per block stay bounded as a build grows); None: the whole build."""
        return None


def merge_counts(extras: list[dict[str, Any]], key: str) -> dict[str, int]:
    """The sum of the ``extra[key]`` counters of a stage's units (a summary helper)."""
    return dict(sum((Counter(e.get(key, {})) for e in extras), Counter()))


__all__ = ["GlobalStage", "Stage", "UnitOutput", "merge_counts"]
