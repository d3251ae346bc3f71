"""Per-row control of one padded ``generate`` call, and ``TextStream``, one row's text as it is generated.

One generate call serves rows with their own settings::

    model.generate ─► each step: _Rows.put(next tokens (B,))      ─► per row: tokens, text pieces (on_piece)
                   ─► each step: _Rows(input_ids) (a StoppingCriteria) ─► per row: end of turn, its own stop strings,
                                                                         its own max_new_tokens, its stop_when
                   ─► a row that ends ─► its GenerationResult at once (on_done); the other rows decode on

The call runs to the largest ``max_new_tokens`` of its rows; a row that ended is fed padding by ``generate`` and
ignored here. ``TextStream`` reads one row's pieces from a queue, holds back what may begin a stop string, and
closing it stops only its row.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .report import GenerationResult, SteeringReport

__all__ = ["TextStream"]


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins one of ``stops`` (and may be completed by later text)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _piece_decoder(tokenizer: Any, emit: Callable[[str], None]) -> Any:
    """transformers' ``TextStreamer`` for one row (its rules for when decoded text is final), emitting to ``emit``."""
    from transformers import TextStreamer

    class _Decoder(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                emit(text)

    return _Decoder(tokenizer, skip_prompt=False, skip_special_tokens=True)


class _Rows:
    """Both the streamer and a stopping criterion of one generate call: per-row tokens, pieces and ends.

    ``finish(row, tokens, reason)`` builds a row's result; it is called exactly once per row, when the row ends
    (``reason``: ``eos``, ``stop``, ``length``, ``stopped`` by ``stop_when``) or after generate returns (``None``)."""

    def __init__(self, tokenizer: Any, prompt_len: int, max_new: Sequence[int], stops: Sequence[Sequence[str]], eos: set[int],
                 stop_when: Sequence[Callable[[], bool] | None], finish: Callable[[int, list[int], str | None], None],
                 on_piece: Callable[[int, str], None] | None = None):
        self.tok = tokenizer
        self.prompt_len = prompt_len
        self.max_new = list(max_new)
        self.stops = [list(s) for s in stops]
        self.eos = eos
        self.stop_when = list(stop_when)
        self.finish = finish
        self.tokens: list[list[int]] = [[] for _ in self.max_new]
        self.done = [False] * len(self.max_new)
        self._prompt_seen = False
        self._window = [4 * max((len(s) for s in st), default=0) + 4 for st in self.stops]
        """Tokens to decode when looking for a stop string: each token is at least one byte, a character at most four."""
        self._decoders = [_piece_decoder(tokenizer, lambda text, row=row: on_piece(row, text)) for row in range(len(self.max_new))] \
            if on_piece is not None else None

    # a transformers streamer
    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate hands the prompt first
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        for row, t in enumerate(ids):
            if self.done[row]:
                continue
            self.tokens[row].append(t)
            if self._decoders is not None and t not in self.eos:
                self._decoders[row].put(torch.tensor([t]))

    def end(self) -> None:
        pass

    # a transformers stopping criterion
    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        for row, done in enumerate(self.done):
            if done:
                continue
            toks = self.tokens[row]
            reason = None
            if toks and toks[-1] in self.eos:
                reason = "eos"
            elif self.stops[row] and toks:
                tail = self.tok.decode(toks[-self._window[row]:], skip_special_tokens=True)
                reason = "stop" if any(s in tail for s in self.stops[row]) else None
            if reason is None and len(toks) >= self.max_new[row]:
                reason = "length"
            if reason is None and (w := self.stop_when[row]) is not None and w():
                reason = "stopped"
            if reason is not None:
                self.end_row(row, reason)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def end_row(self, row: int, reason: str | None) -> None:
        if self.done[row]:
            return
        self.done[row] = True
        if self._decoders is not None:
            self._decoders[row].end()  # flush the row's last piece
        self.finish(row, self.tokens[row], reason)

    def end_all(self) -> None:
        """After generate returned: end the rows it stopped without us (``max_time``, a caller's criterion)."""
        for row in range(len(self.done)):
            self.end_row(row, None)


class _Batch:
    """The worker thread of one streamed generate call and the queues of its rows."""

    def __init__(self, n: int):
        self.queues: list[queue.Queue[tuple[str, Any]]] = [queue.Queue() for _ in range(n)]
        self.stopped = [threading.Event() for _ in range(n)]
        self.callbacks: list[list[Callable[[GenerationResult | None, BaseException | None], None]]] = [[] for _ in range(n)]
        self.results: list[GenerationResult | None] = [None] * n
        self.errors: list[BaseException | None] = [None] * n
        self.ended = [False] * n
        self.finished = [threading.Event() for _ in range(n)]
        self._lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def piece(self, row: int, text: str) -> None:
        self.queues[row].put(("piece", text))

    def end(self, row: int, result: GenerationResult | None, error: BaseException | None = None) -> None:
        with self._lock:
            if self.ended[row]:
                return
            self.ended[row] = True
            self.results[row], self.errors[row] = result, error
            callbacks = list(self.callbacks[row])
        self.queues[row].put(("end", None))
        self.finished[row].set()
        for cb in callbacks:
            cb(result, error)

    def start(self, work: Callable[[], list[GenerationResult]]) -> None:
        def run() -> None:
            try:
                results = work()
            except BaseException as exc:  # re-raised in each row's consumer
                for row in range(len(self.queues)):
                    self.end(row, None, exc)
            else:
                for row, r in enumerate(results):  # rows already ended keep their result
                    self.end(row, r)

        self.thread = threading.Thread(target=run, name="safeguard-stream", daemon=True)
        self.thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)


class TextStream(Iterator[str]):
    """Text pieces of one reply (one row of a generate call) as they are generated; ``.result`` once it is exhausted.

    ``close()`` (or leaving a ``with`` block) stops this row at the next decode step and waits for its end; the
    other rows of the same call go on. An error in generation is re-raised here.

    A ``block`` category that fires in the reply (a pack ``reply`` threshold) ends the row at the next token; the
    pieces already handed out cannot be recalled, so the stream then yields the category's message as its final
    piece, and ``.result`` holds the message as its text with ``finish_reason == "content_filter"``."""

    def __init__(self, batch: _Batch, row: int, stops: Sequence[str]):
        self._batch = batch
        self._row = row
        self._stop = list(stops)
        self._done = False
        self._text = ""
        """Everything generated so far."""
        self._sent = 0
        """How much of ``_text`` was handed out: the rest may be the beginning of a stop string."""

    @property
    def result(self) -> GenerationResult | None:
        return self._batch.results[self._row]

    @property
    def report(self) -> SteeringReport | None:
        return self.result.report if self.result else None

    def add_done_callback(self, fn: Callable[[GenerationResult | None, BaseException | None], None]) -> None:
        """Call ``fn(result, error)`` when this row ends (at once if it has), from the generating thread."""
        b = self._batch
        with b._lock:
            if not b.ended[self._row]:
                b.callbacks[self._row].append(fn)
                return
        fn(b.results[self._row], b.errors[self._row])

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until this row has ended (its text is all generated, whether or not it was read); True if it has."""
        return self._batch.finished[self._row].wait(timeout)

    def _next_or_none(self) -> str | None:
        try:
            return next(self)
        except StopIteration:
            return None

    def __next__(self) -> str:
        q = self._batch.queues[self._row]
        while not self._done:
            kind, value = q.get()
            if kind == "piece":
                self._text += value
                cut = min((self._text.index(s) for s in self._stop if s in self._text), default=None)
                safe = cut if cut is not None else len(self._text) - _held_back(self._text, self._stop)
                if safe > self._sent:
                    out, self._sent = self._text[self._sent:safe], safe
                    return out
                continue
            self._finish()  # the row ended: what is left of its final text, which a stop string cut
            result = self.result
            if result is not None and result.report.blocked:
                if result.text:  # a blocked request generated nothing: its policy's message is the reply
                    return result.text
            elif result is not None and result.text.startswith(self._text[:self._sent]) and len(result.text) > self._sent:
                return result.text[self._sent:]
        raise StopIteration

    def _finish(self) -> None:
        self._done = True
        b = self._batch
        if all(b.ended):
            b.join()
        err, b.errors[self._row] = b.errors[self._row], None
        if err is not None:
            raise err

    def close(self) -> None:
        """Stop this row and wait for its end; safe to call twice."""
        if self._done:
            return
        self._batch.stopped[self._row].set()
        self._batch.finished[self._row].wait()  # the row ends at its next decode step
        self._finish()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self._batch.stopped[self._row].set()
