"""Content-addressed stage artifacts, atomic writes and run manifests.

An artifact lives in `<artifacts_dir>/<NN_stage>/<key>/` and holds `data.parquet`, `stats.json` and
`_SUCCESS`, written last. `key` hashes the stage name, the config the stage reads (models by content), the
content hashes of its inputs and the stage's code (tasks/codehash.py), so a changed input or setting gives a
new directory and an old one is never overwritten. While a long stage runs, its checkpoints sit in `parts/`; a directory
without `_SUCCESS` is never read as done.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

STAGES = ("seeds", "self_instruct", "evol_instruct", "quality", "mix", "finetune", "evaluate")
KEY_LENGTH = 16


def stage_dirname(stage: str) -> str:
    return f"{STAGES.index(stage) + 1:02d}_{stage}"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def source_hash(path: str | Path) -> str:
    """Content hash of an input file, or of every file under a directory (names included); `missing` if
    there is nothing there, so that the stage itself reports the missing input."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(item.relative_to(path)).encode() + b"\0" + sha256_file(item).encode())
        return digest.hexdigest()
    return "missing"


def artifact_key(stage: str, config: dict[str, Any], input_hashes: Iterable[str], version: str) -> str:
    payload = canonical_json({"stage": stage, "config": config, "inputs": list(input_hashes),
                              "code": version})
    return sha256_bytes(payload.encode())[:KEY_LENGTH]


class StorageError(RuntimeError):
    """The output disk refused a write (full, read-only, no permission); the message names the place."""


# errno values, and the words libraries without errno (pyarrow) use, of a disk that refuses writes.
_REFUSALS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
             errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}


def storage_refusal(exc: BaseException) -> str | None:
    """What the disk said, if `exc` is the disk refusing a write (else None). Besides OSError, this reads
    the I/O errors that libraries pass on as text (pyarrow; safetensors: "I/O error: ... (os error 28)")."""
    if isinstance(exc, OSError) and exc.errno in _REFUSALS:
        return _REFUSALS[exc.errno]
    quoted = re.search(r"\[Errno (\d+)\]", str(exc))  # an OSError passed on as text (torchrun's processes)
    if quoted and int(quoted.group(1)) in _REFUSALS:
        return _REFUSALS[int(quoted.group(1))]
    text = str(exc).lower()
    if not (isinstance(exc, OSError) or "i/o error" in text or "os error" in text):
        return None
    return next((words for words in _REFUSALS.values() if words in text), None)


def check_writable(path: str | Path, key: str) -> Path:
    """Create `path` if needed and prove a file can be written there; else a StorageError naming `key`."""
    path = Path(path).resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-")
        probe.close()
    except OSError as exc:
        raise StorageError(f"`{key}`: cannot write to {path} ({exc.strerror or exc})") from None
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` piece by piece: a temp file beside it, fsynced and renamed over it when
    the block ends, removed if it raises; readers see old or new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: readers see old or new, never half."""
    with atomic_file(path) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@dataclass(frozen=True)
class Artifact:
    """One stage output directory."""

    path: Path

    @classmethod
    def at(cls, artifacts_dir: str | Path, stage: str, key: str) -> "Artifact":
        return cls(Path(artifacts_dir) / stage_dirname(stage) / key)

    @property
    def data_path(self) -> Path:
        return self.path / "data.parquet"

    @property
    def stats_path(self) -> Path:
        return self.path / "stats.json"

    @property
    def success_path(self) -> Path:
        return self.path / "_SUCCESS"

    @property
    def parts_dir(self) -> Path:
        return self.path / "parts"

    def is_done(self, verify: bool = False) -> bool:
        """A finished artifact: `_SUCCESS` names the data's hash and size, the data has that size and a
        Parquet footer, and stats.json is there. `verify` also re-hashes the data (a flipped byte), which
        the flow and `execute` do once before reusing an artifact; a corrupted one is then recomputed."""
        if not (self.success_path.is_file() and self.data_path.is_file() and self.stats_path.is_file()):
            return False
        try:
            marker = json.loads(self.success_path.read_text())
            if not (isinstance(marker, dict) and "content_hash" in marker):
                return False
            size = self.data_path.stat().st_size
            if "bytes" in marker and size != marker["bytes"]:
                return False
            with self.data_path.open("rb") as fh:
                fh.seek(max(0, size - 4))
                if fh.read(4) != b"PAR1":  # a truncated Parquet file has lost its footer
                    return False
        except (OSError, ValueError):
            return False
        return not verify or sha256_file(self.data_path) == marker["content_hash"]

    def marker(self) -> dict[str, Any]:
        if not self.is_done():
            raise FileNotFoundError(f"{self.path} is not a finished artifact (no valid _SUCCESS)")
        return json.loads(self.success_path.read_text())

    def content_hash(self) -> str:
        return self.marker()["content_hash"]

    def stats(self) -> dict[str, Any]:
        return json.loads(self.stats_path.read_text())

    def read_table(self) -> pa.Table:
        if not self.is_done():
            raise FileNotFoundError(f"{self.path} is not a finished artifact (no valid _SUCCESS)")
        return pq.read_table(self.data_path)

    def begin(self) -> None:
        """Prepare to (re)write this artifact: any stale `_SUCCESS` goes first, parts are kept."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.success_path.unlink(missing_ok=True)

    def commit(self, table: pa.Table, stats: dict[str, Any]) -> None:
        """Write data, then stats, then `_SUCCESS` naming the data's content hash; drop the parts."""
        atomic_write_parquet(self.data_path, table)
        atomic_write_json(self.stats_path, stats)
        marker = {"content_hash": sha256_file(self.data_path), "bytes": self.data_path.stat().st_size,
                  "rows": table.num_rows,
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(self.success_path, marker)
        if self.parts_dir.exists():
            shutil.rmtree(self.parts_dir)


class PartWriter:
    """Checkpoints of a long stage: numbered Parquet parts, each written atomically.

    A stage whose work is split into shards (run.executor: ray) gives each shard a writer of its own,
    `shard(k)`, in a subdirectory, so that shards on different machines never write the same name; the
    stage's own writer reads its parts and every shard's (`read_all`), so a resumed stage, on one machine
    or sharded again, finds everything that was finished."""

    def __init__(self, parts_dir: Path):
        self.parts_dir = parts_dir

    def existing(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        return sorted(self.parts_dir.glob("part-*.parquet"))

    def shard(self, index: int) -> "PartWriter":
        return PartWriter(self.parts_dir / f"shard-{index:04d}")

    def read_all(self) -> list[pa.Table]:
        """This writer's parts, then each shard's, in order."""
        shards = sorted(self.parts_dir.glob("shard-*/part-*.parquet")) if self.parts_dir.is_dir() else []
        return [pq.read_table(p) for p in self.existing() + shards]

    def write(self, table: pa.Table) -> Path:
        path = self.parts_dir / f"part-{len(self.existing()):05d}.parquet"
        atomic_write_parquet(path, table)
        _drill_after_part(self.parts_dir)
        return path


DRILL_ENV = "INSTRUCTFLOW_DRILL_KILL"


def _drill_after_part(parts_dir: Path) -> None:
    """A failure drill, for rehearsing recovery (and for the tests): with INSTRUCTFLOW_DRILL_KILL set to
    `<pattern>@<n>`, the process that has just written the n-th part into a parts directory whose path
    matches the glob `pattern` kills itself with SIGKILL, once (a `.drilled` marker there says it was done).
    A Ray worker running a shard dies mid-way, as a lost node would leave it."""
    spec = os.environ.get(DRILL_ENV)
    if not spec:
        return
    import fnmatch
    import signal

    pattern, _, n = spec.rpartition("@")
    marker = parts_dir / ".drilled"
    if (fnmatch.fnmatch(str(parts_dir), pattern) and len(list(parts_dir.glob("part-*.parquet"))) >= int(n)
            and not marker.exists()):
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)


def encode_counts(counts: Counter) -> str:
    """Counts as one Parquet metadata value: `a=1,b=2`."""
    return ",".join(f"{k}={v}" for k, v in sorted(counts.items()))


def decode_counts(raw: str) -> Counter:
    counts: Counter = Counter()
    for item in raw.split(","):
        if item:
            key, _, value = item.partition("=")
            counts[key] = int(value)
    return counts


def part_metadata(table: pa.Table) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}


def input_hashes(paths: Iterable[str | Path]) -> list[str]:
    return [Artifact(Path(p)).content_hash() for p in paths]
