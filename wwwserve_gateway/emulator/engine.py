"""The timing model of a continuously batching engine (vLLM-like), in virtual engine seconds.

No sockets, no clock: callers pass the time. The engine runs in steps. At each step boundary the
scheduler admits waiting sequences first come, first served, while the batch has room
(`max_batch`) and the KV cache holds the tokens the sequence must compute. A step decodes one token
for every running sequence in `profile.step_seconds(batch, kv_tokens)`; a step that admits sequences
also prefills them, in the same forward pass: on a GPU it takes the longer of the memory-bound decode
and the compute-bound prefill, on a CPU (`prefill_overlaps_decode` false) their sum.

KV blocks are allocated as tokens are produced, as vLLM's PagedAttention does. When the next step's
tokens do not fit, the most recently admitted sequence is preempted (vLLM V1's policy): its KV is
freed and it returns to the head of the queue; later it recomputes its prompt and what it had
generated. A sequence that waits for KV space is what the engine reports as `waiting`.

Runs of identical steps (no admission, no completion, no preemption) are applied in closed form,
so the cost of advancing the model grows with the number of such events, not with tokens.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from wwwserve_gateway.emulator.profiles import EngineProfile


class SeqState(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


class RequestTooLong(ValueError):
    """Prompt plus output exceed what the engine can hold (vLLM answers 400)."""


@dataclass(eq=False)
class Sequence:
    id: int
    prompt_tokens: int
    output_tokens: int
    arrival: float
    state: SeqState = SeqState.WAITING
    generated: int = 0
    held: int = 0  # tokens in the KV cache
    to_prefill: int = 0  # tokens to compute before decoding: the prompt, plus output after a preemption
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    preemptions: int = 0
    cancel_requested: bool = False

    @property
    def remaining(self) -> int:
        return self.output_tokens - self.generated

    @property
    def done(self) -> bool:
        return self.state in (SeqState.FINISHED, SeqState.CANCELLED)


@dataclass
class EngineLoad:
    running: int
    waiting: int
    kv_usage: float  # fraction of the KV cache in use, 0..1


@dataclass
class _Segment:
    """Steps already committed: `steps` identical decode steps from `start` (the first one also
    prefills `prefill` tokens). Cut short by a new arrival or a cancellation."""

    start: float
    steps: int
    batch: int
    kv0: int
    prefill: int = 0


class EngineModel:
    def __init__(self, profile: EngineProfile, start: float = 0.0) -> None:
        self.profile = profile
        self.now = start  # the end of the last applied step, or the idle time reached
        self.running: list[Sequence] = []  # in admission order
        self.waiting: deque[Sequence] = deque()
        self.kv_used = 0
        self.completed = 0
        self.preemptions = 0
        self._segment: _Segment | None = None
        self._ids = itertools.count(1)

    # -- the caller's side --------------------------------------------------------------------------
    def submit(self, prompt_tokens: int, output_tokens: int, at: float) -> Sequence:
        """Queue a request that arrives at `at` (engine seconds, not before the last call's time)."""
        if prompt_tokens < 1 or output_tokens < 1:
            raise ValueError("a request needs at least one prompt token and one output token")
        if prompt_tokens + output_tokens > self.profile.max_model_len:
            raise RequestTooLong(
                f"prompt ({prompt_tokens} tokens) plus output ({output_tokens}) exceed the engine's "
                f"maximum of {self.profile.max_model_len} tokens"
            )
        self.advance(at)
        seq = Sequence(next(self._ids), prompt_tokens, output_tokens, arrival=at, to_prefill=prompt_tokens)
        self.waiting.append(seq)
        self._cut_segment()  # the scheduler sees it at the next step boundary
        return seq

    def cancel(self, seq: Sequence, at: float) -> None:
        """Abort a request (its client left): a waiting one at once, a running one at the end of the
        step in progress, which frees its KV."""
        self.advance(at)
        if seq.done:
            return
        if seq.state is SeqState.WAITING:
            self.waiting.remove(seq)
            seq.state = SeqState.CANCELLED
            seq.finished_at = at
            return
        seq.cancel_requested = True
        self._cut_segment()

    def advance(self, until: float) -> None:
        """Apply every step that ends by `until`."""
        while True:
            if self._segment is None:
                if self.now >= until:
                    return  # the next boundary is decided once every arrival up to now is queued
                self._begin_segment()
                if self._segment is None:  # idle
                    if math.isfinite(until):
                        self.now = max(self.now, until)
                    return
            seg = self._segment
            done = self._steps_ending_by(seg, until)
            if done == 0:
                return
            self._apply(seg, done)
            if done < seg.steps:
                seg.start, seg.steps, seg.kv0, seg.prefill = self.now, seg.steps - done, self.kv_used, 0
                return
            self._segment = None
            self._end_of_segment()

    def advance_to_next_event(self) -> None:
        """Offline runs: begin steps at the current boundary if none are committed, and apply them."""
        if self._segment is None:
            self._begin_segment()
        nxt = self.next_event()
        if self._segment is not None and nxt is not None:
            self.advance(nxt)

    def next_event(self) -> float | None:
        """When the committed steps end (a sequence finishes or the batch changes), or the boundary
        due now when work is queued and no step is committed; None when idle."""
        seg = self._segment
        if seg is None:
            return self.now if self.running or self.waiting else None
        return seg.start + self._duration(seg, seg.steps)

    def load(self) -> EngineLoad:
        return EngineLoad(
            len(self.running), len(self.waiting), self.kv_used / self.profile.kv_capacity_tokens
        )

    # -- steps -------------------------------------------------------------------------------------
    def _duration(self, seg: _Segment, steps: int) -> float:
        """Seconds of the first `steps` steps of `seg`: each reads the KV held at its start, which
        grows by one token per sequence per step."""
        p = self.profile
        per_token = p.decode_per_kv_token_us / 1e6
        if seg.prefill:  # a one-step segment: prefill shares the forward pass with the decodes
            memory = p.decode_base_ms / 1e3 + per_token * seg.kv0
            prefill = p.prefill_seconds(seg.prefill)
            both = max(memory, prefill) if p.prefill_overlaps_decode else memory + prefill
            return p.decode_per_seq_ms * seg.batch / 1e3 + both
        fixed = (p.decode_base_ms + p.decode_per_seq_ms * seg.batch) / 1e3
        kv_sum = steps * seg.kv0 + seg.batch * steps * (steps - 1) / 2
        return steps * fixed + per_token * kv_sum

    def _steps_ending_by(self, seg: _Segment, until: float) -> int:
        if not math.isfinite(until):
            return seg.steps
        budget = until - seg.start + 1e-9  # next_event() is start + duration: allow the rounding
        if self._duration(seg, seg.steps) <= budget:
            return seg.steps
        lo, hi = 0, seg.steps  # largest k with duration(k) <= budget: duration is increasing in k
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._duration(seg, mid) <= budget:
                lo = mid
            else:
                hi = mid
        return lo

    def _apply(self, seg: _Segment, steps: int) -> None:
        self.now = seg.start + self._duration(seg, steps)
        for seq in self.running:
            if seq.to_prefill:  # only in a segment's first step
                seq.held += seq.to_prefill
                seq.to_prefill = 0
            if seq.first_token_at is None:
                seq.first_token_at = seg.start + self._duration(seg, 1)
            seq.generated += steps
            seq.held += steps
        self.kv_used += seg.batch * steps

    def _cut_segment(self) -> None:
        """End the committed run after the step in progress (steps ending by now are applied)."""
        if self._segment is not None:
            self._segment.steps = 1

    def _end_of_segment(self) -> None:
        keep = []
        for seq in self.running:
            if seq.remaining <= 0:
                seq.state, seq.finished_at = SeqState.FINISHED, self.now
                self.completed += 1
            elif seq.cancel_requested:
                seq.state, seq.finished_at = SeqState.CANCELLED, self.now
            else:
                keep.append(seq)
                continue
            self.kv_used -= seq.held
            seq.held = 0
        self.running = keep

    def _begin_segment(self) -> None:
        self._admit()
        self._make_room()
        if not self.running:
            return
        batch = len(self.running)
        prefill = sum(s.to_prefill for s in self.running)
        steps = 1
        if not prefill:
            free = self.profile.kv_capacity_tokens - self.kv_used
            steps = max(1, min(min(s.remaining for s in self.running), free // batch))
        self._segment = _Segment(self.now, steps, batch, self.kv_used, prefill)

    def _admit(self) -> None:
        p = self.profile
        while self.waiting and len(self.running) < p.max_batch:
            seq = self.waiting[0]
            # Room for what it computes now, plus the token this step produces for every sequence.
            if self.kv_used + seq.to_prefill + len(self.running) + 1 > p.kv_capacity_tokens:
                break
            self.waiting.popleft()
            seq.state = SeqState.RUNNING
            if seq.admitted_at is None:
                seq.admitted_at = self.now
            # Blocks for the tokens to compute are allocated on admission; they move to `held` once
            # the prefill step is applied.
            self.kv_used += seq.to_prefill
            self.running.append(seq)

    def _make_room(self) -> None:
        """Preempt the newest sequences until every running one has room for its next token."""
        while self.running and self.kv_used + len(self.running) > self.profile.kv_capacity_tokens:
            victim = self.running.pop()
            self.kv_used -= victim.held + victim.to_prefill
            victim.held = 0
            victim.to_prefill = victim.prompt_tokens + victim.generated
            victim.state = SeqState.WAITING
            victim.preemptions += 1
            self.preemptions += 1
            self.waiting.appendleft(victim)


def simulate(profile: EngineProfile, requests: Iterable[tuple[float, int, int]]) -> list[Sequence]:
    """Run the model offline: (arrival, prompt tokens, output tokens) per request, arrivals in any
    order; returns the sequences, finished, in arrival order."""
    engine = EngineModel(profile)
    seqs = [engine.submit(p, o, at) for at, p, o in sorted(requests)]
    engine.advance(math.inf)
    return seqs
