"""The pieces every stage is made of: the Stage declaration, the build context, reading unit inputs."""

from .context import BuildContext, StageContext
from .stage import GlobalStage, Stage, UnitOutput

__all__ = ["BuildContext", "GlobalStage", "Stage", "StageContext", "UnitOutput"]
