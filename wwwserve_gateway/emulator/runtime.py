"""The timing model in real time: engine seconds run `time_scale` times faster than the wall clock.

One asyncio task advances the model to the scaled clock, completes the sequences that finished and
sleeps until the model's next event (a completion, a preemption, a step that admits new work) or
until a request arrives or leaves. No sockets here, so the timing can be tested directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from wwwserve_gateway.emulator.engine import EngineLoad, EngineModel, Sequence
from wwwserve_gateway.emulator.profiles import EngineProfile


class ScaledClock:
    """Engine seconds since start: wall-clock seconds times `time_scale`."""

    def __init__(self, time_scale: float = 1.0) -> None:
        if time_scale <= 0:
            raise ValueError("the time scale must be > 0")
        self.time_scale = time_scale
        self._t0 = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._t0) * self.time_scale

    def wall_seconds(self, engine_seconds: float) -> float:
        return engine_seconds / self.time_scale


class EngineRuntime:
    def __init__(self, profile: EngineProfile, time_scale: float = 1.0) -> None:
        self.profile = profile
        self.clock = ScaledClock(time_scale)
        self.model = EngineModel(profile, start=self.clock.now())
        self._waiters: dict[Sequence, asyncio.Future[None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for fut in self._waiters.values():
            if not fut.done():
                fut.cancel()

    # -- requests -----------------------------------------------------------------------------------
    def submit(self, prompt_tokens: int, output_tokens: int) -> Sequence:
        """Queue a request now; raises RequestTooLong (a 400) when it cannot fit."""
        seq = self.model.submit(prompt_tokens, output_tokens, self.clock.now())
        self._waiters[seq] = asyncio.get_running_loop().create_future()
        self._wake.set()
        return seq

    async def wait(self, seq: Sequence, within_s: float | None = None) -> bool:
        """Until `seq` is finished (True), or `within_s` wall seconds pass (False)."""
        fut = self._waiters.get(seq)
        if fut is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(fut), within_s)
        except TimeoutError:
            return False
        return True

    def cancel(self, seq: Sequence) -> None:
        self.model.cancel(seq, self.clock.now())
        self._wake.set()

    def generated(self, seq: Sequence) -> int:
        """Tokens `seq` has produced by now."""
        self.model.advance(self.clock.now())
        return seq.generated

    def load(self) -> EngineLoad:
        self.model.advance(self.clock.now())
        return self.model.load()

    # -- the loop -----------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            self._wake.clear()
            self.model.advance(self.clock.now())
            self._complete_finished()
            nxt = self.model.next_event()
            timeout = None if nxt is None else max(0.0, self.clock.wall_seconds(nxt - self.clock.now()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _complete_finished(self) -> None:
        done = [seq for seq in self._waiters if seq.done]
        for seq in done:
            fut = self._waiters.pop(seq)
            if not fut.done():
                fut.set_result(None)
