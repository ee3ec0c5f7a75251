"""Shards: a stage's in-process model work cut into pieces that run on other processes or machines.

With `run.executor: ray`, a stage that holds a model (Evol-Instruct and the judge on an in-process model,
DEITA and IFD scoring) cuts its items into shards. A shard names a function by module path and gives it
paths and config sections only, never tables: it reads its rows from the stage's input artifact, loads
its model, and writes its checkpoint parts into a parts directory of its own (`PartWriter.shard`), on
storage every node sees. When every shard is done, the stage runs as it does locally and finds all its
items already finished in the parts: the output is assembled by the same code, in the same order.

Nothing here imports Ray or Prefect; tasks/ray_executor.py runs the shards (`Sharding.run`).
"""

from __future__ import annotations

import importlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shard:
    """One shard: `fn` ("module:function") called with `kwargs`, covering items [first, last) of its stage."""

    stage: str
    index: int
    count: int
    fn: str
    kwargs: dict[str, Any]
    first: int
    last: int
    unit: str = "rows"

    @property
    def name(self) -> str:
        span = f"{self.unit} {self.first}-{self.last - 1}" if self.last - self.first > 1 else \
            f"{self.unit.rstrip('s')} {self.first}"
        return f"{self.stage} shard {self.index + 1}/{self.count} ({span})"


@dataclass(frozen=True)
class Sharding:
    """How a stage hands shards to a cluster: `run(shards)` returns each shard's result in order (or
    raises once a shard has failed for good); `count()` is how many shards to cut."""

    run: Callable[[list[Shard]], list[dict[str, Any]]]
    count: Callable[[], int]


@dataclass(frozen=True)
class StageShards:
    """A stage's sharding, and what its shards need to rebuild their inputs where they run: the input
    artifact's Parquet file and the sections (as JSON) of the models they load."""

    sharding: Sharding
    source: str
    models: dict[str, dict[str, Any]]


def summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Figures for stats.json: shards, attempts, the slowest and total shard seconds, and each shard's result."""
    seconds = [r["seconds"] for r in results]
    return {"shards": len(results), "attempts": sum(r["attempts"] for r in results),
            "seconds_max": max(seconds, default=0.0), "seconds_sum": round(sum(seconds), 3),
            "hosts": sorted({r["host"] for r in results}),
            "per_shard": [{k: v for k, v in r.items() if k != "pid"} for r in results]}


def cut(n: int, shards: int) -> list[tuple[int, int]]:
    """[first, last) ranges cutting n items into at most `shards` contiguous pieces as equal as can be."""
    shards = max(1, min(shards, n))
    bounds = [n * i // shards for i in range(shards + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def plan(stage: str, fn: str, n: int, shards: int, kwargs: Callable[[int, int, int], dict[str, Any]],
         unit: str = "rows") -> list[Shard]:
    """The shards of `n` items: shard k covering [a, b) calls `fn(**kwargs(k, a, b))`."""
    ranges = cut(n, shards)
    return [Shard(stage, k, len(ranges), fn, kwargs(k, a, b), a, b, unit) for k, (a, b) in enumerate(ranges)]


def run_shard(fn: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Call a shard's function where it runs; its result, with the seconds it took and where it ran."""
    module, _, name = fn.partition(":")
    t0 = time.perf_counter()
    result = getattr(importlib.import_module(module), name)(**kwargs)
    return {**result, "seconds": round(time.perf_counter() - t0, 3), "host": socket.gethostname(),
            "pid": os.getpid()}


def run_items(sharding: Sharding, stage: str, fn: str, keys: Sequence[str], parts, kwargs: dict[str, Any]
              ) -> list[dict[str, Any]]:
    """Shard the items `keys` of a work-engine stage that its parts (`parts`, a PartWriter: the stage's
    and every shard's) do not close yet: shard k runs `fn(**kwargs, only=<its keys>, parts_dir=<its own>)`."""
    from tasks.engine import finished_keys

    done = finished_keys(parts)
    todo = [k for k in keys if k not in done]
    shards = plan(stage, fn, len(todo), sharding.count(),
                  lambda k, a, b: {**kwargs, "only": todo[a:b], "parts_dir": str(parts.shard(k).parts_dir)},
                  unit="items")
    return sharding.run(shards) if shards else []
