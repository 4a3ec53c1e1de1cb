"""What the process runner's forkserver loads before it forks a worker (flows/pool.py).

Importing :mod:`refforge.flows.pool` brings the stages, pyarrow and numpy; the lexicons a unit loads
lazily (LemmInflect's, ~70 MB resident) are loaded here too, so that every worker shares the
forkserver's copy of the pages instead of making its own (issue 18: two workers held ~90 MB each).
``gc.freeze()`` then moves all of it out of the collector's generations: a worker's full collection
would otherwise visit every one of those objects and so copy the pages they live on.
"""

from __future__ import annotations

import gc

from refforge.stages.scene.vocabulary import preload

from . import pool  # noqa: F401 - the worker's own code and every stage's module

preload()
gc.freeze()
