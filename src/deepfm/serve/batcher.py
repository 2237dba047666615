"""Concurrent predict requests coalesced into one forward pass (dynamic batching, as Triton's dynamic batcher,
TorchServe's ``max_batch_delay`` and Ray Serve's ``@serve.batch`` do).

A request of fewer than ``max_rows`` validated rows waits in a queue; one task per worker takes what is
queued (and, with ``delay`` > 0, waits that long for more) up to ``max_rows`` rows, scores them in one
forward pass off the event loop, and hands each request its own slice, in order. While a pass runs, new
requests queue, so under load each pass takes many requests and at low load a request waits for nothing.

* Each request keeps the model it took at its start: a batch holds requests of one model only, so a reload
  during a burst answers every request, each by the model it started with.
* A request's failure never fails its neighbours: if a coalesced pass raises a client error (a value only
  the batch encoder rejects, a row another request's text form conflicts with), every request of the batch
  is scored again on its own and only the bad one gets the error.
* Requests of ``max_rows`` rows or more go straight through (``score_rows``), like every request when
  ``max_rows`` is 1.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import numpy as np
from fastapi.concurrency import run_in_threadpool

from deepfm.serve.encode import RequestRows, frame_probs
from deepfm.serve.errors import RequestError
from deepfm.serve.metrics import Metrics
from deepfm.serve.state import ServedModel


def score_rows(served: ServedModel, rows: RequestRows, fast_max: int) -> tuple[np.ndarray, str]:
    """Validated rows -> (probabilities, encoder used): the per-record encoder for up to ``fast_max`` rows of
    plain values (exactly the batch encoder's arrays, without its fixed cost), else the batch encoder."""
    if not rows:
        return np.zeros(0), "none"
    if len(rows) <= fast_max and served.fast.eligible(rows):
        return served.fast.probs(rows), "fast"
    return frame_probs(served.predictor, rows), "frame"


@dataclass
class _Job:
    served: ServedModel
    rows: RequestRows
    future: asyncio.Future = field(repr=False)


@dataclass
class _Lane:
    """The queue of one event loop and the task that drains it."""

    queue: asyncio.Queue[_Job]
    carry: _Job | None = None  # taken from the queue but belongs to the next batch
    task: asyncio.Task | None = None


class Batcher:
    """One per app; its task starts with the first queued request, on the server's event loop."""

    def __init__(self, max_rows: int, delay_s: float, fast_max: int, metrics: Metrics) -> None:
        self.max_rows, self.delay_s, self.fast_max, self.metrics = max_rows, delay_s, fast_max, metrics
        # a coalesced pass of plain values takes the per-record encoder whole (unless it is turned off)
        self.fast_max_batch = max(fast_max, max_rows) if fast_max > 0 else 0
        # one queue and task per event loop: a server runs one, but a test client runs each request on a
        # loop of its own, from several threads at once, and a request queued on another loop's queue
        # would never be woken up
        self._lanes: dict[asyncio.AbstractEventLoop, _Lane] = {}

    @property
    def enabled(self) -> bool:
        return self.max_rows > 1

    async def score(self, served: ServedModel, rows: RequestRows) -> np.ndarray:
        """This request's probabilities, coalesced with its concurrent neighbours' when it is small."""
        if not self.enabled or len(rows) >= self.max_rows or not rows:
            probs, path = await run_in_threadpool(score_rows, served, rows, self.fast_max)
            self.metrics.scored(path, len(rows), requests=1)
            return probs
        loop = asyncio.get_running_loop()
        lane = self._lanes.get(loop)
        if lane is None or lane.task is None or lane.task.done():
            for closed in [k for k in self._lanes if k.is_closed()]:
                del self._lanes[closed]
            lane = self._lanes[loop] = _Lane(asyncio.Queue())
            lane.task = loop.create_task(self._run(lane))
        job = _Job(served, rows, loop.create_future())
        lane.queue.put_nowait(job)
        return await job.future

    async def _run(self, lane: _Lane) -> None:
        while True:
            batch = await self._collect(lane)
            await self._score(batch)

    async def _collect(self, lane: _Lane) -> list[_Job]:
        """The next batch: the first waiting request, then what else is queued (and arrives within the
        delay) for the same model, up to ``max_rows`` rows."""
        first = lane.carry or await lane.queue.get()
        lane.carry = None
        batch, n = [first], len(first.rows)
        deadline = asyncio.get_running_loop().time() + self.delay_s
        while n < self.max_rows:
            try:
                job = lane.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(lane.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if job.served is not first.served or n + len(job.rows) > self.max_rows:
                lane.carry = job
                break
            batch.append(job)
            n += len(job.rows)
        return batch

    async def _score(self, batch: list[_Job]) -> None:
        live = [j for j in batch if not j.future.done()]  # a client that went away needs no answer
        if not live:
            return
        rows = RequestRows.concat([j.rows for j in live])
        try:
            probs, path = await run_in_threadpool(score_rows, live[0].served, rows, self.fast_max_batch)
        except RequestError as err:
            if len(live) == 1:
                _fail(live[0], err)
            else:
                for job in live:  # someone's row: find whose, each request on its own
                    await self._score([job])
            return
        except Exception as err:  # not a client's mistake: every request of the pass learns of it
            for job in live:
                _fail(job, err)
            return
        self.metrics.scored(path, len(rows), requests=len(live))
        start = 0
        for job in live:
            if not job.future.done():
                job.future.set_result(probs[start:start + len(job.rows)])
            start += len(job.rows)

    async def close(self) -> None:
        lane = self._lanes.pop(asyncio.get_running_loop(), None)
        if lane is not None and lane.task is not None:
            lane.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await lane.task


def _fail(job: _Job, err: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(err)
