"""Batching settings, jobs, and the window micro-batcher (``BatchingConfig(mode="window")``): concurrent requests that
arrive within a short window share one padded generate call. The default mode, ``iteration``, is ``continuous.py``:
requests join the running batch between decode steps.

``SteeredLLM(..., batching=BatchingConfig(window_ms=5, max_batch=8))`` (or ``llm.enable_batching()``) routes
``generate`` / ``chat`` / ``stream`` and their async forms through one batcher owned by the model;
``safeguard serve`` submits its requests to the same batcher. Off by default: then every call is its own generate,
serialized by the model lock.

One worker thread owns the model, for streaming and non-streaming requests alike::

    submit() ─► pending deque ─► worker: wait up to ``window_s`` after the oldest job for more jobs with the same
    sampler ─► llm.stream_batch(prompts, policies=, max_new_tokens=, stops=, stop_when=) ─► per row:
        a streaming job's Future gets its TextStream at once; a non-streaming job's Future gets its result when
        its row ends (not when the batch does)

Each row keeps its own policy, ``max_new_tokens`` and stop strings: the call runs to the largest ``max_new_tokens`` and
each row ends at its own limit. Rows in one batch share ``temperature`` and ``seed`` (``Settings.key``): one generate
call has one sampler (one logits warper, one random stream), so rows with another temperature wait for a later round,
in arrival order, and a sampled request with a seed runs alone. A row whose request is abandoned (client gone,
timeout) stops at the next decode step through its ``stop_when``; the other rows continue.

The window costs latency: a request that finds the worker idle waits up to ``window_s`` for companions (never longer;
a full batch leaves at once). With ``max_batch=1`` and ``window_s=0`` this is a plain serial queue.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError, SafeguardError

__all__ = ["BatchingConfig", "Job", "MicroBatcher", "Settings"]

log = logging.getLogger("safeguard")
_solo = itertools.count()


@dataclass(frozen=True)
class BatchingConfig:
    """Engine batching of up to ``max_batch`` rows. ``mode="iteration"`` (default): a call joins the running batch at
    the next decode step; a call that finds the model idle waits up to ``window_ms`` for companions to share its
    prefill. ``mode="window"``: calls arriving within ``window_ms`` of the first waiting one share one generate call,
    and a call arriving while a batch generates waits for it to end."""

    window_ms: float = 5.0
    max_batch: int = 8
    mode: str = "iteration"
    """``iteration``: requests join the running batch between decode steps and a row that ends frees its slot
    (``continuous.py``); the window applies only when the model is idle. ``window``: the micro-batcher of this module,
    where a request arriving while a batch generates waits for it to end."""

    def __post_init__(self) -> None:
        import math
        import numbers

        if self.mode not in ("iteration", "window"):
            raise InputError(f"mode must be 'iteration' or 'window', got {self.mode!r:.40}")

        for name, v in (("window_ms", self.window_ms), ("max_batch", self.max_batch)):
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise InputError(f"{name} must be a finite number, got {v!r:.40}")
        if self.window_ms < 0 or self.max_batch < 1 or int(self.max_batch) != self.max_batch:
            raise InputError(f"window_ms must be >= 0 and max_batch an integer >= 1, got {self.window_ms}, {self.max_batch}")


@dataclass(frozen=True)
class Settings:
    """Generation settings of one request. In the window micro-batcher only ``key`` (the sampler) must be shared by a
    batch's rows; the iteration batcher (``continuous.py``) shares none of them."""

    max_new_tokens: int
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    template: bool = True
    """Send a string prompt through the chat template (shared by a batch's rows)."""
    extra: tuple[tuple[str, Any], ...] = ()
    """Further ``generate`` keyword arguments, sorted (``max_time``...): shared by a batch's rows."""

    @property
    def key(self) -> tuple[Any, ...]:
        if self.seed is not None and self.temperature:  # a seeded sample is only reproducible alone
            return ("solo", next(_solo))
        if not self.temperature:  # greedy: the seed changes nothing
            return (None, None, self.template, self.extra)
        return (self.temperature, None, self.template, self.extra)


@dataclass(eq=False)
class Job:
    """One request waiting for its row. ``abandon()`` stops its row at the next decode step."""

    prompt: Any
    policy: Any
    settings: Settings
    deadline: float = float("inf")
    """``time.monotonic()`` after which the row stops generating."""
    future: Future = field(default_factory=Future)
    key: tuple[Any, ...] = ()
    arrived: float = field(default_factory=time.monotonic)
    parent: Any = None
    """The trace context its row's span is parented to (the server request's span)."""
    stream: bool = False
    """The future gets a ``TextStream`` when generation starts, instead of the result when it ends."""
    shadows: Any = None
    """The row's compiled shadow policies (``None``: the policy's own)."""
    cancel: threading.Event | None = None
    """Set by the caller (a cancelled async call): the row stops at its next decode step."""
    _abandoned: threading.Event = field(default_factory=threading.Event)

    def abandon(self) -> None:
        self._abandoned.set()

    @property
    def abandoned(self) -> bool:
        return self._abandoned.is_set() or (self.cancel is not None and self.cancel.is_set()) or time.monotonic() >= self.deadline

    def result(self) -> Any:
        """Wait for the row's result (or its ``TextStream``); re-raises its error."""
        return self.future.result()


class _JobQueue:
    """What both engine batchers share: a thread-safe queue of jobs, one worker thread that owns the model, and
    ``close()``, which finishes every submitted job before joining it. Subclasses set their state in ``_setup`` and
    run ``_loop`` in the worker."""

    def __init__(self, llm: Any, *, window_s: float = 0.005, max_batch: int = 8, on_batch: Any = None):
        if window_s < 0 or max_batch < 1:
            raise InputError(f"window_s must be >= 0 and max_batch >= 1, got {window_s}, {max_batch}")
        self.llm = llm
        self.window_s = float(window_s)
        self.max_batch = int(max_batch)
        self.on_batch = on_batch
        """Called with the number of rows of every batch (metrics)."""
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._setup()
        self._thread = threading.Thread(target=self._loop, name="safeguard-batcher", daemon=True)
        self._thread.start()

    def _setup(self) -> None:
        """The subclass's own state, set before the worker starts."""

    def _loop(self) -> None:
        raise NotImplementedError

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, prompt: Any, policy: Any, settings: Settings, *, deadline: float = float("inf"), stream: bool = False,
               parent: Any = None, shadows: Any = None, cancel: threading.Event | None = None) -> Job:
        """Queue one prompt (a string or message list) under ``policy`` (a ``Policy``, ``None`` for the active one,
        ``False`` for none). Returns the job; ``job.future`` holds the result (``stream=True``: the row's
        ``TextStream``, once its row has started)."""
        job = Job(prompt, policy, settings, deadline, stream=stream, parent=parent, shadows=shadows, cancel=cancel)
        job.key = settings.key
        with self._cond:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def in_worker(self) -> bool:
        """Whether the calling thread is the worker (a call from it must not queue behind itself)."""
        return threading.current_thread() is self._thread

    def close(self, timeout: float | None = None) -> None:
        """Stop taking jobs, finish the pending and running ones, join the worker (errors go to the futures)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)


class MicroBatcher(_JobQueue):
    """Collect concurrent requests for ``window_s`` seconds and generate them as one batch of up to ``max_batch`` rows.

    ``submit`` is thread-safe and returns a job whose ``future`` (a ``concurrent.futures.Future``; ``asyncio.wrap_future``
    awaits it) holds a ``GenerationResult``, or a ``TextStream`` for ``stream=True``. ``close()`` finishes every submitted job, then joins the worker.
    """

    def __repr__(self) -> str:
        return f"MicroBatcher(window_s={self.window_s}, max_batch={self.max_batch}, pending={len(self._pending)})"

    # ------------------------------------------------------------------------------------------ worker
    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._pending[0]
            until = first.arrived + self.window_s
            while not self._closed:
                same = sum(1 for j in self._pending if j.key == first.key)
                left = until - time.monotonic()
                if same >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            taken: list[Job] = []
            kept: deque[Job] = deque()
            for j in self._pending:
                (taken if j.key == first.key and len(taken) < self.max_batch else kept).append(j)
            self._pending = kept
            return taken

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        if self.on_batch is not None:
            self.on_batch(len(jobs))
        try:
            streams = self._start(jobs)
        except SafeguardError as exc:
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            for j in jobs:  # one bad row must not fail its neighbours: find it by running each alone
                self._run([j])
            return
        except BaseException as exc:
            log.exception("batch of %d rows failed", len(jobs))
            for j in jobs:
                j.future.set_exception(exc)
            return
        retry: list[Job] = []

        def done(result: Any, error: BaseException | None, j: Job) -> None:
            if error is None:
                j.future.set_result(result)
            elif len(jobs) > 1:  # the shared call failed (inside the forward pass): each row is tried again alone
                retry.append(j)
            else:
                j.future.set_exception(error)

        for j, st in zip(jobs, streams, strict=True):
            if j.stream:  # a stream already handed out gets the error itself
                j.future.set_result(st)
            else:
                st.add_done_callback(lambda result, error, j=j: done(result, error, j))
        for st in streams:  # the model is busy until every row has ended (whether or not its stream was read)
            st.wait()
        if retry:
            log.warning("a batch of %d rows failed; retrying %d of them one by one", len(jobs), len(retry))
            for j in retry:
                self._run([j])

    def _start(self, jobs: list[Job]) -> list[Any]:
        s = jobs[0].settings
        shadows = [j.shadows for j in jobs]
        return self.llm.stream_batch(
            [j.prompt for j in jobs],
            policies=[j.policy for j in jobs],
            max_new_tokens=[j.settings.max_new_tokens for j in jobs],
            stops=[list(j.settings.stop) for j in jobs],
            temperature=s.temperature,
            seed=s.seed,
            template=s.template,
            stop_when=[lambda j=j: j.abandoned for j in jobs],
            _parents=[j.parent for j in jobs],
            _shadows=shadows if any(x is not None for x in shadows) else None,
            **dict(s.extra),
        )
