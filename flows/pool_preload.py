"""What the process runner's forkserver loads before it forks a worker (flows/pool.py).

Importing :mod:`refforge.flows.pool` brings the stages, pyarrow and numpy; the lexicons a unit loads
lazily (LemmInflect's, ~70 MB resident) are loaded here too, so that every worker shares the
forkserver's copy of the pages instead of making its own (issue 18: two workers held ~90 MB each).
``gc.freeze()`` then moves all of it out of the collector's generations: a worker's full collection
would otherwise visit every one of those objects and so copy the pages they live on.

Arrow allocates from the system allocator in the workers: its default pool (mimalloc) kept what a
unit had freed, ~130 MB per worker once refine's blocks had run, while glibc's heap gives it back
(``release_memory`` after a global step). Peak PSS of the build 963 -> 851 MiB at 4,000 scenes and
1,040 -> 910 MiB at 16,000, 4,000-scene wall time within 2% (benchmarks/RESULTS.md, issue 18).
"""

from __future__ import annotations

import gc

import pyarrow as pa

from refforge.stages.scene.vocabulary import preload

from . import pool  # noqa: F401 - the worker's own code and every stage's module

pa.set_memory_pool(pa.system_memory_pool())
preload()
gc.freeze()
