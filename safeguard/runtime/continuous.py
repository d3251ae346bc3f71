"""Iteration-level batching: requests join the running batch between decode steps, and a row that ends frees its slot.

The default engine batching (``BatchingConfig(mode="iteration")``). One worker thread owns the model and runs its own
decode loop over one KV cache (a transformers ``DynamicCache``)::

    submit() ─► pending ─► between two decode steps: take the waiting jobs (up to the free slots)
        ─► prefill them together (left-padded, under ``steering(model, run)``: their detection runs here, as in a
           single request) ─► each row's state taken out of the prefill's run (``RunState.row_state``)
        ─► first token per row ─► the rows' cache rows are left-padded and joined to the running batch
    decode step ─► one forward of every running row (explicit positions and attention mask), hooks dispatching each
                   row's slice of the residual stream to its own state (reply watching, steering of generated
                   positions) ─► per row: its logits processors (its sampler, block, opener), its token (argmax, or
                   a sample from its own seeded generator), its stop strings / max tokens / cancellation
               ─► rows that ended leave the batch (``index_select`` on the cache), their padding columns are trimmed

Each row keeps every setting of its own: policy, shadows, max tokens, stop strings, temperature, seed, ``max_time``.
When the model is idle, the first request waits up to ``window_s`` for companions (they share its prefill); while it
is busy, a request waits at most one decode step before its prefill. Greedy rows give their single-request text up to
float rounding: a row decoded beside others attends over left padding and shares matrix products with them, which can
change the last bits of its logits (never the tokens on the tests' tiny model; see tests/test_continuous.py).

When a shared forward raises, no row is failed for it: a prefill of several rows is retried row by row, and after a
failed decode step every row is run again alone (``SteeredLLM._run``); a streaming row's stream continues with the text
it had not yet handed out, when the rerun reproduces what it had (else it gets the error).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from .. import telemetry
from .batching import Job, _JobQueue
from .openers import ForceOpener, uses_openers
from .steering import RunState, SteeringHandle, decoder_layers, generate_positions, steering
from .streams import TextStream, _Batch, _Rows

__all__ = ["IterationBatcher", "supports_iteration"]

log = logging.getLogger("safeguard")


def supports_iteration(model: Any) -> bool:
    """Whether ``model``'s KV cache can be left-padded and joined row by row: every layer a plain ``DynamicLayer``
    (no sliding window, no linear attention state), and its forward takes ``cache``, ``position_ids`` and
    ``logits_to_keep`` (transformers 5)."""
    import inspect

    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        params = inspect.signature(model.forward).parameters
        if not {"cache", "position_ids", "attention_mask", "logits_to_keep"} <= set(params):
            return False
        return all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)
    except Exception:  # an unknown model or transformers version: the window micro-batcher serves it
        return False


class _Row:
    """One request's row: its own steering state, stop rules, sampler and stream, and its place in the KV cache."""

    def __init__(self, job: Job, policy: Any, shadows: list[Any], ids: list[int], user: list[bool], last: list[bool], temperature: float | None,
                 seed: int | None, max_new: int, stops: list[str], extra: dict[str, Any]):
        self.job = job
        self.policy = policy
        self.shadows = shadows
        self.ids, self.user, self.last = ids, user, last
        self.temperature = temperature
        self.seed = seed
        self.max_new = max_new
        self.stops = stops
        self.extra = extra
        self.max_time: float | None = extra.get("max_time")
        self.out = _Batch(1)
        """The row's queue, events and result, which its ``TextStream`` reads."""
        self.emitted = ""
        """Text pieces handed to the stream so far (a rerun after a failed step skips them)."""
        self.t0 = time.perf_counter()
        self.started = time.monotonic()
        self.span: Any = None
        self.run: RunState | None = None
        self.rows: _Rows | None = None
        self.procs: Any = None
        self.force: ForceOpener | None = None
        self.generator: torch.Generator | None = None
        self.full: list[int] = []
        """Padded prompt ids and generated ids: what ``generate`` would hand its logits processors for this row."""
        self.length = 0
        """Real tokens of this row in the cache (its next position id)."""
        self.next_token = 0
        self.hooks: dict[int, Any] = {}

    @property
    def done(self) -> bool:
        return self.rows is not None and self.rows.done[0]

    def stop_when(self) -> bool:
        return self.out.stopped[0].is_set() or self.job.abandoned


class IterationBatcher(_JobQueue):
    """Iteration-level batching of up to ``max_batch`` rows (see the module's docstring). The same interface as
    ``MicroBatcher``: ``submit`` is thread-safe and returns a job whose future holds a ``GenerationResult`` (or a
    ``TextStream`` for ``stream=True``, as soon as the row's prefill is done); ``close()`` finishes every submitted
    job, then joins the worker. ``on_batch`` is called with the number of rows of every prefill (rows that joined
    together)."""

    def _setup(self) -> None:
        self.steps = 0
        """Decode steps run so far (forwards of the running batch)."""
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._procs: dict[tuple[Any, ...], Any] = {}

    def __repr__(self) -> str:
        return f"IterationBatcher(window_s={self.window_s}, max_batch={self.max_batch}, running={len(self._rows)}, pending={len(self._pending)})"

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return len(self._rows)

    # ------------------------------------------------------------------------------------------ worker
    def _take(self) -> list[Job] | None:
        """The jobs to admit now: with rows running, whatever waits (no waiting); idle, the first job and those that
        arrive within ``window_s`` of it. ``None``: closed and nothing left."""
        with self._cond:
            free = self.max_batch - len(self._rows)
            if self._rows:
                if free <= 0 or not self._pending:
                    return []
            else:
                while not self._pending:
                    if self._closed:
                        return None
                    self._cond.wait()
                until = self._pending[0].arrived + self.window_s
                while not self._closed and len(self._pending) < free:
                    left = until - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            return [self._pending.popleft() for _ in range(min(free, len(self._pending)))]

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            try:
                if jobs:
                    self._admit(jobs)
                if self._rows:
                    self._step()
            except BaseException as exc:  # a bug here must not leave callers waiting forever
                log.exception("the batching worker failed")
                for r in self._rows:
                    self._fail(r, exc)
                self._rows, self._cache, self._mask = [], None, None
                for j in jobs or ():
                    if not j.future.done():
                        j.future.set_exception(exc)

    # --------------------------------------------------------------------------------------- admission
    def _prepare(self, job: Job) -> _Row:
        """A job's row, every setting validated (a bad one fails this job alone)."""
        from .llm import _max_new_tokens, _seed, _stop_strings, _temperature

        llm, s = self.llm, job.settings
        compiled = llm._row_policies([job.prompt], [job.policy], None, True)[0]
        shadows = list(job.shadows) if job.shadows is not None else llm._shadows(compiled, None)
        max_new = _max_new_tokens(s.max_new_tokens)[0]
        stops = _stop_strings(list(s.stop))
        extra = dict(s.extra)
        llm._gen_kwargs([max_new], s.temperature, None, extra)
        ids, user, last = llm.token_masks(job.prompt, s.template)
        llm._check_fits(len(ids), max_new)
        return _Row(job, compiled, shadows, ids, user, last, _temperature(s.temperature), _seed(s.seed), max_new, stops, extra)

    def _admit(self, jobs: list[Job]) -> None:
        rows: list[_Row] = []
        for j in jobs:
            if not j.future.set_running_or_notify_cancel():
                continue
            try:
                rows.append(self._prepare(j))
            except Exception as exc:
                j.future.set_exception(exc)
        for r in [r for r in rows if r.job.abandoned]:  # cancelled while it waited: ends at once, unprefilled
            rows.remove(r)
            self._start_row(r, None)
            self._finish(r, [], None)
        if not rows:
            return
        if self.on_batch is not None:
            self.on_batch(len(rows))
        try:
            self._prefill(rows)
        except Exception as exc:
            if len(rows) == 1:
                self._fail(rows[0], exc)
                return
            log.warning("a prefill of %d rows failed (%s); prefilling them one by one", len(rows), type(exc).__name__)
            for r in rows:  # nothing of them was handed out yet: each is tried again alone
                try:
                    self._prefill([r])
                except Exception as exc1:
                    self._fail(r, exc1)

    def _start_row(self, r: _Row, run: RunState | None) -> None:
        """The row's span, its ``_Rows`` (stop rules, pieces) and its future: a stream is handed out now."""
        llm = self.llm
        if r.span is None:
            r.span = telemetry.start_span("chat", llm.model_name, parent=r.job.parent, attributes={
                "gen_ai.request.max_tokens": r.max_new, "gen_ai.request.temperature": r.temperature or 0.0})
        r.run = run if run is not None else RunState([r.policy], torch.tensor([r.user]), torch.ones((1, len(r.ids)), dtype=torch.long),
                                                     shadows=[r.shadows], last_turn_mask=torch.tensor([r.last]))

        def piece(row: int, text: str) -> None:
            r.emitted += text
            r.out.piece(0, text)

        r.rows = _Rows(llm.tokenizer, len(r.full), [r.max_new], [r.stops], llm._eos_ids(), [r.stop_when],
                       lambda row, gen, reason: self._finish(r, gen, reason), piece if r.job.stream else None)
        r.rows._prompt_seen = True
        if r.job.stream:
            r.job.future.set_result(TextStream(r.out, 0, r.stops))
        else:  # no TextStream: an unread one would stop the row when collected
            def done(result: Any, error: BaseException | None) -> None:
                if error is None:
                    r.job.future.set_result(result)
                else:
                    r.job.future.set_exception(error)

            with r.out._lock:
                r.out.callbacks[0].append(done)

    def _prefill(self, rows: list[_Row]) -> None:
        """One left-padded forward of the joining rows under their policies' hooks, then each row's first token; the
        rows that go on join the running batch."""
        llm = self.llm
        n, width = len(rows), max(len(r.ids) for r in rows)
        pad = llm.tokenizer.pad_token_id
        ids = torch.full((n, width), pad if pad is not None else 0, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        user = torch.zeros((n, width), dtype=torch.bool)
        last = torch.zeros((n, width), dtype=torch.bool)
        for i, r in enumerate(rows):  # left padding
            k = len(r.ids)
            ids[i, width - k:] = torch.tensor(r.ids)
            attn[i, width - k:] = 1
            user[i, width - k:] = torch.tensor(r.user)
            last[i, width - k:] = torch.tensor(r.last)
        run = RunState([r.policy for r in rows], user, attn, shadows=[r.shadows for r in rows], last_turn_mask=last)
        dev = llm.device
        with llm._model_lock, torch.inference_mode(), steering(llm.model, run):
            out = llm.model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=generate_positions(attn).to(dev),
                            use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        cache = out.cache
        keep: list[int] = []
        for i, r in enumerate(rows):  # from here on, an error is one row's own
            try:
                r.full = ids[i].tolist()
                r.length = len(r.ids)
                self._start_row(r, run.row_state(i))
                self._setup_sampling(r, width)
                self._advance(r, logits[i:i + 1])
                if not r.done:
                    r.hooks = r.run.decode_hooks()  # type: ignore[union-attr]
                    keep.append(i)
            except Exception as exc:
                self._fail(r, exc)
        if not keep:
            return
        try:
            mask = attn[keep].to(dev)
            if len(keep) < n:
                idx = torch.tensor(keep, device=dev)
                for layer in cache.layers:
                    layer.keys, layer.values = layer.keys[idx], layer.values[idx]
            self._join([rows[i] for i in keep], cache, mask)
        except Exception as exc:  # not retried: their streams may be handed out
            for i in keep:
                self._fail(rows[i], exc)

    def _setup_sampling(self, r: _Row, width: int) -> None:
        """The row's logits processors as ``generate`` builds them for its settings, with the engine's own (blocked
        rows end, refusal openers) in the same order as ``SteeredLLM._run`` adds them; its own seeded generator."""
        from transformers import LogitsProcessorList

        from .llm import _EndBlockedRows

        llm, run = self.llm, r.run
        custom: list[Any] = []
        p = r.policy
        if p is not None and p.enforce and any(c.response == "block" for c in p.categories):
            custom.append(_EndBlockedRows(run, sorted(llm._eos_ids())))  # type: ignore[arg-type]
        if uses_openers([p]):
            r.force = ForceOpener(run, llm.tokenizer, width, llm._eos_ids())  # type: ignore[arg-type]
            custom.append(r.force)
        kw = llm._gen_kwargs([r.max_new], r.temperature, None, {k: v for k, v in r.extra.items() if k != "max_time"})
        model = llm.model
        gc, mk = model._prepare_generation_config(None, **kw)
        r.procs = model._get_logits_processor(generation_config=gc, input_ids_seq_length=width, encoder_input_ids=torch.tensor([r.full]),
                                              prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(custom),
                                              device=str(llm.device), model_kwargs=mk)
        if r.temperature is not None and r.seed is not None:
            r.generator = torch.Generator(device=llm.device).manual_seed(r.seed)

    def _advance(self, r: _Row, logits: torch.Tensor) -> None:
        """Pick the row's next token from its logits (1, V) and feed it to its stop rules and stream."""
        scores = r.procs(torch.tensor([r.full], device=logits.device), logits) if r.procs else logits
        if r.temperature is not None:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            tok = int(torch.multinomial(probs, num_samples=1, generator=r.generator)[0, 0])
        else:
            tok = int(torch.argmax(scores, dim=-1)[0])
        r.full.append(tok)
        r.next_token = tok
        rows = r.rows
        assert rows is not None
        rows.put(torch.tensor([tok]))
        rows(torch.empty((1, len(r.full))))
        if not rows.done[0] and r.max_time is not None and time.monotonic() - r.started >= r.max_time:
            rows.end_row(0, None)  # max_time: finish_reason "time"

    def _join(self, rows: list[_Row], cache: Any, mask: torch.Tensor) -> None:
        """Left-pad the new rows' cache (or the running one) to a common length and stack them on the batch dim."""
        if self._cache is None:
            self._rows, self._cache, self._mask = list(rows), cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])  # type: ignore[union-attr]

        def left(t: torch.Tensor, dim: int) -> torch.Tensor:
            short = width - t.shape[dim]
            if short == 0:
                return t
            shape = list(t.shape)
            shape[dim] = short
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for a, b in zip(self._cache.layers, cache.layers, strict=True):
            a.keys = torch.cat([left(a.keys, -2), left(b.keys, -2)], 0)
            a.values = torch.cat([left(a.values, -2), left(b.values, -2)], 0)
        self._mask = torch.cat([left(self._mask, 1), left(mask, 1)], 0)  # type: ignore[arg-type]
        self._rows += rows

    # --------------------------------------------------------------------------------------- decoding
    def _step(self) -> None:
        """One decode forward of every running row; rows that ended leave the batch."""
        llm, rows = self.llm, self._rows
        dev = llm.device
        ids = torch.tensor([[r.next_token] for r in rows], device=dev)
        pos = torch.tensor([[r.length] for r in rows], device=dev)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], 1)  # type: ignore[list-item]
        for r in rows:
            r.run.begin_step()  # type: ignore[union-attr]
            if r.hooks and r.run.calls == 2:  # type: ignore[union-attr]
                r.hooks = r.run.decode_hooks()  # type: ignore[union-attr]
        try:
            with llm._model_lock, torch.inference_mode():
                handle = SteeringHandle()
                try:
                    self._dispatch(handle, rows)
                    out = llm.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=self._cache, use_cache=True, logits_to_keep=1)
                finally:
                    handle.remove()
        except Exception as exc:
            self._rows, self._cache, self._mask = [], None, None
            self._rerun(rows, exc)
            return
        self.steps += 1
        self._mask = mask
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        for i, r in enumerate(rows):
            r.length += 1
            self._advance(r, logits[i:i + 1])
        keep = [i for i, r in enumerate(rows) if not r.done]
        if len(keep) < len(rows):
            self._drop(keep)

    def _dispatch(self, handle: SteeringHandle, rows: list[_Row]) -> None:
        """Register one hook per layer that hands each row's slice of the layer's output to that row's own hook."""
        by_layer: dict[int, list[tuple[int, Any]]] = {}
        for i, r in enumerate(rows):
            for layer, fn in r.hooks.items():
                by_layer.setdefault(layer, []).append((i, fn))
        if not by_layer:
            return
        layers = decoder_layers(self.llm.model)
        for layer, entries in sorted(by_layer.items()):
            def hook(module: Any, args: Any, output: Any, entries: list[tuple[int, Any]] = entries) -> Any:
                h = output[0] if isinstance(output, tuple) else output
                new = None
                for i, fn in entries:
                    got = fn(module, args, h[i:i + 1])
                    if got is not None:
                        if new is None:
                            new = h.clone()
                        new[i:i + 1] = got
                if new is None:
                    return None
                return (new, *output[1:]) if isinstance(output, tuple) else new

            handle._register(layers[layer], hook)

    def _drop(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` in the batch and the cache; trim the padding columns no row uses any more."""
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        mask = self._mask[keep]  # type: ignore[index]
        used = mask.any(0).nonzero()
        lo = int(used[0]) if len(used) else 0
        idx = torch.tensor(keep, device=mask.device)
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, lo:], layer.values[idx, :, lo:]
        self._mask = mask[:, lo:]

    # ----------------------------------------------------------------------------------------- endings
    def _finish(self, r: _Row, gen: list[int], reason: str | None) -> None:
        llm = self.llm
        opener = r.force is not None and 0 in r.force.forced
        try:
            result = llm._row_result(r.job.prompt, r.run, 0, gen, reason, r.max_new, r.stops, len(r.ids), r.max_time is not None,
                                     time.perf_counter() - r.t0, opener=opener)
        except Exception as exc:
            self._fail(r, exc)
            return
        if r.span is not None:
            r.span.record_result(result)
            r.span.end()
            r.span = None
        r.out.end(0, result)

    def _fail(self, r: _Row, exc: BaseException) -> None:
        """End the row with ``exc``: its stream (or its result callback) raises it, or its future, when the row never
        started."""
        if r.span is not None:
            r.span.error(exc)
            r.span.end()
            r.span = None
        if r.rows is not None:
            r.rows.done[0] = True
        r.out.end(0, None, exc)
        if not r.job.future.done():
            r.job.future.set_exception(exc)

    def _rerun(self, rows: list[_Row], exc: BaseException) -> None:
        """A shared decode step raised: run each row again alone (``SteeredLLM._run``), so that one bad row cannot fail
        the others. A stream goes on where it was when the rerun reproduces the text it handed out."""
        if len(rows) == 1:
            self._fail(rows[0], exc)
            return
        log.warning("a decode step of %d rows failed (%s); running each row again alone", len(rows), type(exc).__name__)
        llm = self.llm
        for r in rows:
            s = r.job.settings
            sent = r.emitted
            acc = [""]
            diverged = [False]

            def piece(row: int, text: str, r: _Row = r, sent: str = sent, acc: list[str] = acc, diverged: list[bool] = diverged) -> None:
                before = acc[0]
                acc[0] += text
                if diverged[0]:
                    return
                if not (acc[0].startswith(sent) or sent.startswith(acc[0])):
                    diverged[0] = True
                    return
                new = acc[0][max(len(sent), len(before)):]
                if new:
                    r.emitted += new
                    r.out.piece(0, new)

            if r.span is not None:  # the rerun has a span of its own
                r.span.error(exc)
                r.span.end()
                r.span = None
            try:
                result = llm._run([r.job.prompt], [r.policy], max_new_tokens=r.max_new, temperature=r.temperature, stop=None, stops=[r.stops],
                                  template=s.template, seed=r.seed, extra=r.extra, stop_when=[r.stop_when],
                                  on_piece=piece if r.job.stream else None, shadows=[r.shadows], parents=[r.job.parent])[0]
            except Exception as exc1:
                r.out.end(0, None, exc1)
                continue
            if diverged[0] or (r.job.stream and not acc[0].startswith(sent)):
                r.out.end(0, None, exc)  # the rerun does not continue what the stream showed
            else:
                r.out.end(0, result)
