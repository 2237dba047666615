"""Which ranks see the same checkpoint folder, and how ranks on machines that share none resume together.

One process, or several ranks on one machine or on a shared filesystem, see one checkpoint folder: rank 0
writes it (under row sharding every rank writes its part into it) and every rank reads it on ``--resume``.
Ranks on machines that share no filesystem (``data.prepare_on: every_rank`` needs none) each see their own
folder under the same path. ``probe`` finds out which, at the start of a run, by each rank leaving a marker
named by a token rank 0 drew and looking for the others' markers: ranks that see each other's markers share
a folder, and the lowest of them (its ``leader``) is the one that swaps in directories there.

When the ranks are ``apart`` (some rank does not see rank 0's folder), the rules are (see ``placement``):

- Rank 0's checkpoint is the one truth. It sends the other ranks what they cannot read (``distributed.from_main``):
  ``state.json`` (epoch, batch, step) and, for a replicated table, its weights and optimiser state (every rank
  holds the same); a replicated table's checkpoint is written on rank 0's machine only, so a checkpoint left in
  another machine's folder (by another run) is never read.
- A row-sharded table's shard lives only on the rank that holds it, so every rank writes its part in its own
  folder, stamped (``part.json``: run, step, rank, number of ranks), and keeps the part before it (``previous``):
  the machines swap in a new checkpoint one by one, so a job stopped between two machines' swaps leaves them
  one checkpoint in common. On ``--resume`` the ranks exchange their stamps and resume from the newest of rank
  0's parts that every rank holds (``choose_part``); where there is none, a rank whose part is missing or was
  written at another step or by another run (a stale folder) stops the job with an error naming the rank and
  both steps (``check_parts``): resuming from it would mix two models. Without a checkpoint on rank 0 the job
  starts afresh (rank 0 wins). The same holds for the best epoch's weights (one kept: an epoch's end cut short
  is run again from the checkpoint before it).

Nothing changes for ranks that share one folder: no marker stays, no stamp is written, nothing is sent.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from deepfm.errors import ConfigError
from deepfm.io import atomic_write_text
from deepfm.train import distributed as ddp

STAMP = "part.json"
PREVIOUS = "previous"  # beside ``last``: the checkpoint before it, kept where the ranks are apart


@dataclass(frozen=True)
class FolderShare:
    peers: tuple[int, ...] = (0,)  # the ranks that see this rank's folder, itself included
    rank: int = 0
    apart: bool = False  # some rank does not see rank 0's folder (the same on every rank)
    token: str = ""  # drawn by rank 0 for this launch: the run's name in stamps when it starts afresh

    @property
    def is_leader(self) -> bool:
        """Whether this rank swaps in the directories of its folder (the lowest rank that sees it)."""
        return self.rank == min(self.peers)

    @property
    def with_main(self) -> bool:
        """Whether this rank sees rank 0's folder (and so rank 0's checkpoint)."""
        return 0 in self.peers


def one_folder(ctx: ddp.DistContext) -> FolderShare:
    """Every rank sees one folder: one process, or what a run assumes before ``probe``."""
    return FolderShare(tuple(range(ctx.world_size)), ctx.rank)


def probe(folder: Path, ctx: ddp.DistContext) -> FolderShare:
    """Which ranks see this rank's ``folder`` (created here). Every rank must call it; the markers are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    if not ctx.enabled:
        return one_folder(ctx)
    token = ddp.from_main(uuid.uuid4().hex if ctx.is_main else None, ctx)
    mark = folder / f".rank-{ctx.rank}-{token}.probe"
    mark.touch()
    ctx.barrier()
    peers = tuple(r for r in range(ctx.world_size) if (folder / f".rank-{r}-{token}.probe").exists())
    ctx.barrier()
    mark.unlink()
    every = ddp.gather_objects(peers, ctx)
    return FolderShare(peers, ctx.rank, any(len(p) < ctx.world_size for p in every), token)


def stamp(folder: Path, ctx: ddp.DistContext, run: str, step: int) -> None:
    """Name a rank's part of a checkpoint: which run wrote it, at which step, on which of how many ranks."""
    atomic_write_text(folder / STAMP, json.dumps({"run": run, "step": step, "rank": ctx.rank,
                                                  "world_size": ctx.world_size}))


def read_stamp(folder: Path) -> dict | None:
    path = folder / STAMP
    return json.loads(path.read_text()) if path.is_file() else None


def gather_parts(places: list[Path], ctx: ddp.DistContext) -> list[list[dict]]:
    """Every rank's stamps of its parts at ``places`` (on its own machine, newest first), with the paths."""
    return ddp.gather_objects([{"path": str(p), "stamp": read_stamp(p)} for p in places], ctx)


def choose_part(what: str, parts: list[list[dict]]) -> tuple[dict, list[int]] | None:
    """The newest of rank 0's stamped parts (``parts[rank]``: ``gather_parts``) that every rank holds, and where
    each rank holds it (the index into its places). None when rank 0 has no part; when no part of rank 0's is
    held by every rank, ``check_parts``'s error on each rank's newest part."""
    world = len(parts)
    for main in (p["stamp"] for p in parts[0] if p["stamp"] is not None):
        picks = [next((k for k, p in enumerate(mine) if _same(p["stamp"], main, r, world)), None)
                 for r, mine in enumerate(parts)]
        if None not in picks:
            return main, [int(k) for k in picks]
    newest = [next((p for p in mine if p["stamp"] is not None), mine[0]) for mine in parts]
    if check_parts(what, newest) is None:
        return None
    raise ConfigError(f"no part of the {what} that every rank holds")  # (check_parts names the rank first)


def _same(got: dict | None, main: dict, rank: int, world: int) -> bool:
    return got is not None and (got["run"], got["step"], got["rank"], got["world_size"]) == (
        main["run"], main["step"], rank, world)


def check_parts(what: str, parts: list[dict]) -> dict | None:
    """Rank 0's stamp when every rank's part of ``what`` matches it; None when rank 0 has no part (every rank
    starts without it). Otherwise a ConfigError naming the first rank whose part is missing or another's."""
    main = parts[0]["stamp"]
    if main is None:
        return None
    world = len(parts)
    for r, part in enumerate(parts):
        got = part["stamp"]
        if got is None:
            raise ConfigError(f"rank {r} has no part of the {what} in {part['path']} on its machine, while rank "
                              f"0's is at step {main['step']}: each rank resumes its table shard from its own "
                              "folder; start again without --resume, or bring that rank's folder back")
        if got["world_size"] != world or got["rank"] != r:
            raise ConfigError(f"rank {r}'s part of the {what} in {part['path']} was written by rank {got['rank']} "
                              f"of {got['world_size']}, not rank {r} of {world}: resume with the number of ranks "
                              "(and the order of machines) it was written with")
        if got["step"] != main["step"] or got["run"] != main["run"]:
            raise ConfigError(f"rank {r}'s part of the {what} in {part['path']} is at step {got['step']} (run "
                              f"{got['run']}), rank 0's at step {main['step']} (run {main['run']}): a stale folder "
                              "from another run, or a checkpoint write cut short between machines; resuming would "
                              "mix two models: start again without --resume")
    return main
