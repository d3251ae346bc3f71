"""The steering engine: forward hooks that detect categories during prefill and steer the rows that fire.

Data flow of one ``generate`` call::

    prefill ──► layer d (detect): encode the residual stream with the few SAE encoder columns the
                policy needs, score each category over the user's tokens, per batch row
            ──► layer s (steer):  for rows whose categories fired, add decoder directions / dense
                vectors, or clamp feature activations, on prompt and/or generated positions
    decode  ──► layer s: same per-row steering on each new token (decisions are kept)
            ──► layer d, for categories with a reply threshold that have not fired: score the generated tokens
                so far (running max); a row whose reply fires gets the category's response from the next token on

Rows that do not fire are never written to, so they are bit-for-bit what the unsteered model computes
in the same batch. Each row may carry its own compiled policy (or none). Hooks live only inside
``steering(model, run)``, which removes every hook it registered on every exit path.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PolicyError, SteeringError, UnsupportedModelError
from ._files import contained_path
from .compile import ResolvedPolicy, resolve
from .names import same_model
from .policy import AddAction, ClampAction, Policy, VectorAction
from .saes import FeatureEncoder, SAESet

__all__ = ["CompiledPolicy", "Decision", "RunState", "SteeringHandle", "attach", "decoder_layers", "steering"]


def decoder_layers(model: Any) -> Any:
    """The list of decoder layers of a Hugging Face causal LM (Llama, Mistral, Qwen, Phi-3, GPT-2, ...)."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    raise UnsupportedModelError(f"model: cannot find the decoder layers of {type(model).__name__} (looked for model.layers, model.decoder.layers, "
                                "transformer.h, gpt_neox.layers, layers); safeguard knows Llama-style models")


class _Stopped(Exception):
    pass


def forward_until(model: Any, block: Any, **inputs: Any) -> None:
    """``model(**inputs, use_cache=False)`` run only as far as decoder ``block``: the forward hooks registered
    before this call on that block and the ones before it have run when it returns; later layers never do."""

    def stop(module: Any, args: Any, output: Any) -> None:
        raise _Stopped

    handle = block.register_forward_hook(stop)
    try:
        model(**inputs, use_cache=False)
    except _Stopped:
        pass
    finally:
        handle.remove()


def generate_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids ``generate`` gives left-padded rows: counting from each row's first real token."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def _decoder_stack(model: Any) -> torch.nn.Module:
    for path in ("model", "model.decoder", "transformer", "gpt_neox"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "forward"):
            return obj
    return model


# ----------------------------------------------------------------------------------------- compiled
@dataclass
class _Action:
    spec: AddAction | ClampAction | VectorAction
    layer: int
    positions: str
    vector: torch.Tensor | None = None
    """Added as is (add: unit decoder row x strength; vector: dense vector x strength)."""
    encoder: FeatureEncoder | None = None
    """Clamp: the feature's encoder."""
    dec_row: torch.Tensor | None = None
    value: float = 0.0


@dataclass
class _Category:
    id: str
    label: str
    response: str
    layer: int
    threshold: float
    combine: str
    reduce: str
    index: torch.Tensor
    weights: torch.Tensor | None
    actions: list[_Action]
    order: str = "combine_first"
    message: str | None = None
    turns: str = "all"
    """``all``: read every user token; ``last``: only the last user message's tokens (``RunState.last_turn_mask``)."""
    reply_threshold: float | None = None
    """Also scored on the generated tokens, firing at this threshold (``None``: the prompt decides alone)."""
    last_weights: torch.Tensor | None = None
    """Weights of the features at the last token of the mask, added to the pooled score (``Detect.last_weights``)."""
    window: int | None = None
    """Only the last ``window`` positions of the mask are read (``Detect.window``; ``None``: all of them)."""

    def score(self, acts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return detection_score(acts, mask, weights=self.weights, combine=self.combine, reduce=self.reduce, order=self.order,
                               last_weights=self.last_weights)


def tail_mask(mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """``mask`` (..., P) with only the last ``window`` True positions of each row kept (``None``: ``mask`` itself)."""
    if window is None:
        return mask
    from_end = mask.flip(-1).to(torch.int32).cumsum(-1).flip(-1)  # True positions at or after each position
    return mask & (from_end <= window)


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """(n,) the index of the last True position of each row of ``mask`` (n, P) (0 for a row with none)."""
    p = mask.shape[-1]
    return (p - 1 - mask.flip(-1).to(torch.int8).argmax(-1)).masked_fill(~mask.any(-1), 0)


def detection_score(acts: torch.Tensor, mask: torch.Tensor, *, weights: torch.Tensor | None = None, combine: str = "max", reduce: str = "max",
                    order: str = "combine_first", last_weights: torch.Tensor | None = None) -> torch.Tensor:
    """A category's scores (n,) from its features' activations ``acts`` (n, P, k) and the user-token ``mask``
    (n, P), as a policy's ``detect`` block defines them. A row without user tokens scores -inf (never fires).
    ``last_weights`` (k,): the features at each row's last masked position, weighed, are added (``reduce_first``
    with a weighted ``sum`` only, as ``Detect`` checks)."""

    def combined(a: torch.Tensor) -> torch.Tensor:
        if combine == "max":
            return a.amax(-1)
        if combine == "mean":
            return a.mean(-1)
        return (a * weights).sum(-1) if weights is not None else a.sum(-1)

    if order == "reduce_first":
        m = mask[..., None]
        pooled = acts.masked_fill(~m, float("-inf")).amax(1) if reduce == "max" else (acts * m).sum(1) / m.sum(1).clamp(min=1)
        scores = combined(pooled.masked_fill(~m.any(1), 0.0))
        if last_weights is not None:
            at = last_positions(mask)
            last = acts[torch.arange(acts.shape[0], device=acts.device), at]  # (n, k)
            scores = scores + (last * last_weights).sum(-1)
    elif last_weights is not None:
        raise SteeringError("last_weights needs order: reduce_first")
    else:
        per_tok = combined(acts)
        scores = per_tok.masked_fill(~mask, float("-inf")).amax(-1) if reduce == "max" else (per_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return scores.masked_fill(~mask.any(-1), float("-inf"))


class CompiledPolicy:
    """A resolved policy turned into tensors for one model's SAEs, device and dtype. Compiling checks everything a
    policy and its pack can get wrong against the loaded model, so a swap either fully succeeds or changes nothing.

    ``hash`` covers every byte that changes behaviour: the policy and its extends chain, the pack and its vector
    files, and the identity of the SAE weights it reads. ``monitor=True`` compiles it to decide and never act."""

    def __init__(self, policy: Policy | ResolvedPolicy, saes: SAESet, *, model_name: str, num_layers: int, device: torch.device,
                 dtype: torch.dtype, monitor: bool = False):
        resolved = policy if isinstance(policy, ResolvedPolicy) else resolve(policy, None)
        self.resolved = resolved
        self.policy = resolved.policy
        self.pack = resolved.pack
        where = f"policy {self.policy.name!r}" + (f" with pack {self.pack.id!r}" if self.pack else "")
        if resolved.model is not None and not same_model(resolved.model, model_name):
            raise PolicyError(f"{where}: made for model {resolved.model!r}, but the loaded model is {model_name!r}")
        self._check(resolved, saes, num_layers, where)
        self.enforce = self.policy.mode == "enforce" and not monitor
        self.mode = "enforce" if self.enforce else "monitor"
        by_layer: dict[int, list[int]] = {}
        for c in resolved.categories:
            feats = by_layer.setdefault(c.detect.layer, [])
            feats.extend(f for f in c.detect.features if f not in feats)
        self.encoders = {layer: saes[layer].encoder(feats).to(device) for layer, feats in by_layer.items()}
        self.categories: list[_Category] = []
        for c in resolved.categories:
            d = c.detect
            union = by_layer[d.layer]
            index = torch.tensor([union.index(f) for f in d.features], device=device)
            weights = torch.tensor(d.weights, device=device) if d.weights is not None else None
            last_weights = torch.tensor(d.last_weights, device=device) if d.last_weights is not None else None
            actions = [self._compile_action(a, base, saes, device, dtype, where) for a, base in c.steer]
            self.categories.append(_Category(c.id, c.label, c.response, d.layer, d.threshold, d.combine, d.reduce, index, weights, actions,
                                             d.order, c.message, d.turns, c.reply_threshold, last_weights, d.window))
        self.reply: dict[int, _ReplyDetector] = {}
        """Per detect layer: the categories that also watch the reply, as one small set of tensors."""
        for layer in sorted(by_layer):
            watched = [(cat, c.detect) for cat, c in zip(self.categories, resolved.categories, strict=True)
                       if cat.layer == layer and cat.reply_threshold is not None]
            if watched:
                self.reply[layer] = _ReplyDetector(watched, saes[layer], device)
        self.detect_layers = sorted(by_layer)
        self.steer_layers = sorted({a.layer for c in self.categories for a in c.actions})
        h = hashlib.sha256(resolved.hash.encode())
        for layer in sorted(set(self.detect_layers) | set(self.steer_layers)):
            if layer in saes:
                h.update(f"{layer}:{saes[layer].identity}".encode())
        self.hash = h.hexdigest()

    @staticmethod
    def _check(resolved: ResolvedPolicy, saes: SAESet, num_layers: int, where: str) -> None:
        for c in resolved.categories:
            refs: list[tuple[str, int, int | None]] = [(f"categories.{c.id}.detect", c.detect.layer, f) for f in c.detect.features]
            refs += [(f"categories.{c.id}.steer[{j}]", a.layer, getattr(a, "feature", None)) for j, (a, _) in enumerate(c.steer)]
            for field_path, layer, feature in refs:
                if not 0 <= layer < num_layers:
                    raise PolicyError(f"{where}: {field_path}.layer is {layer}, but the model has layers 0..{num_layers - 1}")
                if feature is None:
                    continue
                if layer not in saes:
                    raise PolicyError(f"{where}: {field_path} uses SAE features at layer {layer}, but SAEs are loaded at layers {sorted(saes)}")
                sae = saes[layer]
                if resolved.sae is not None and sae.release != resolved.sae:
                    raise PolicyError(f"{where}: its features index SAE {resolved.sae!r}, but the SAE at layer {layer} is {sae.release!r}")
                if not 0 <= feature < sae.d_sae:
                    raise PolicyError(f"{where}: {field_path} names feature {feature}, but the SAE at layer {layer} has features 0..{sae.d_sae - 1}")

    def _compile_action(self, a: Any, base: str | None, saes: SAESet, device: torch.device, dtype: torch.dtype, where: str) -> _Action:
        if isinstance(a, AddAction):
            row = saes[a.layer].decoder_rows([a.feature])[0]
            return _Action(a, a.layer, a.positions, vector=(row / row.norm() * a.strength).to(device, dtype))
        if isinstance(a, ClampAction):
            enc = saes[a.layer].encoder([a.feature]).to(device)
            row = saes[a.layer].decoder_rows([a.feature])[0].to(device)
            return _Action(a, a.layer, a.positions, encoder=enc, dec_row=row, value=a.value)
        from safetensors.torch import load_file

        path = contained_path(base or ".", a.file, where=f"{where}: vector file")
        if not path.is_file():
            raise PolicyError(f"{where}: vector file {a.file!r} does not exist (looked at {path})")
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise PolicyError(f"{where}: cannot read vector file {path}: {type(exc).__name__}") from None
        if a.key not in tensors:
            raise PolicyError(f"{where}: vector file {path} has no key {a.key!r}; keys: {sorted(tensors)}")
        vec = tensors[a.key].float().flatten()
        d = next(iter(saes.values())).d_in if len(saes) else vec.numel()
        if vec.numel() != d:
            raise PolicyError(f"{where}: vector {a.key!r} in {path} has {vec.numel()} values, the model's hidden size is {d}")
        if not torch.isfinite(vec).all():
            raise PolicyError(f"{where}: vector {a.key!r} in {path} holds NaN or infinite values")
        return _Action(a, a.layer, a.positions, vector=(vec * a.strength).to(device, dtype))

    def layers(self) -> set[int]:
        return set(self.detect_layers) | set(self.steer_layers)


class _ReplyDetector:
    """The reply-watching categories of one policy at one layer. Per generated token: encode only their features'
    encoder columns, keep a running max per feature (``reduce_first``) or per token score (``combine_first``), and
    score every category at once: ``M @ w_pool + S`` (a linear combine: ``sum``, weighted or not, or ``mean``),
    ``M[:, idx].amax(-1)`` (``combine: max``, the same in either order)."""

    def __init__(self, watched: list[tuple[_Category, Any]], sae: Any, device: torch.device):
        self.categories = [c for c, _ in watched]
        if any(c.last_weights is not None for c in self.categories):  # the pack refuses this combination; a guard for hand-built ones
            raise PolicyError(f"categories {[c.id for c in self.categories if c.last_weights is not None]} read the last user token "
                              "(last_weights), which a reply does not have: reply watching is not defined for them")
        feats: list[int] = []
        for _, d in watched:
            feats.extend(f for f in d.features if f not in feats)
        self.encoder = sae.encoder(feats).to(device)
        k, n = len(feats), len(watched)
        self.w_pool = torch.zeros(k, n)
        """Linear combines of ``reduce_first`` categories, applied to the pooled features."""
        self.w_token = torch.zeros(k, n)
        """Linear combines of ``combine_first`` categories, applied to each token."""
        self.max_cols: list[tuple[int, torch.Tensor]] = []
        for j, (c, d) in enumerate(watched):
            idx = [feats.index(f) for f in d.features]
            if c.combine == "max":
                self.max_cols.append((j, torch.tensor(idx, device=device)))
                continue
            w = torch.tensor(d.weights) if d.weights is not None else torch.ones(len(idx))
            if c.combine == "mean":
                w = w / len(idx)
            (self.w_pool if c.order == "reduce_first" else self.w_token)[idx, j] = w
        dtype = self.encoder.dtype
        self.w_pool, self.w_token = self.w_pool.to(device, dtype), self.w_token.to(device, dtype)
        self.token_cols = torch.tensor([c.order != "reduce_first" and c.combine != "max" for c in self.categories], device=device)
        self.thresholds = torch.tensor([c.reply_threshold for c in self.categories], device=device, dtype=dtype)


@dataclass
class _Watch:
    """One policy's rows watched at one layer while the reply is generated."""

    detector: _ReplyDetector
    rows: list[int]
    index: torch.Tensor | None
    """``rows`` as a tensor, or ``None`` when they are every row of the batch in order (no gather needed)."""
    active: torch.Tensor
    """(n, C) categories still to watch per row (not fired at the prompt or in the reply so far)."""
    pooled: torch.Tensor | None = None
    """(n, K) running max of each feature over the generated tokens."""
    token_max: torch.Tensor | None = None
    """(n, C) running max of each ``combine_first`` category's per-token score."""


# ---------------------------------------------------------------------------------------- run state
@dataclass(frozen=True)
class Decision:
    """One category's verdict on one request."""

    category: str
    label: str
    response: str
    score: float
    threshold: float
    fired: bool
    layer: int
    message: str | None = None
    """For a ``block`` category: the reply its policy gives instead of generating."""
    where: str = "prompt"
    """Where it was decided: ``prompt`` (at prefill) or ``reply`` (fired while the reply was generated; ``score`` and
    ``threshold`` are then the reply detector's)."""
    token: int | None = None
    """For ``where == "reply"``: the index (from 0) of the generated token whose representation fired it; the
    response applies from token ``token + 1`` on."""
    prompt_score: float | None = None
    """For ``where == "reply"``: the score the prompt had (below its threshold)."""


@dataclass
class RunState:
    """Everything one generate call's hooks share: per-row policies, masks, and the decisions made."""

    policies: Sequence[CompiledPolicy | None]
    user_mask: torch.Tensor
    """(B, P) True on the user's tokens: detection reads only these."""
    attention_mask: torch.Tensor
    """(B, P) of the padded prompt: prompt-position steering skips padding."""
    shadows: Sequence[Sequence[CompiledPolicy]] | None = None
    """Per row, policies whose detectors are scored from the same activations and reported, never acted on."""
    last_turn_mask: torch.Tensor | None = None
    """(B, P) True on the last user message's tokens, for detectors with ``turns: last`` (default: ``user_mask``;
    for a single-turn prompt the two are equal)."""
    decisions: list[dict[str, Decision]] = field(default_factory=list)
    shadow_decisions: list[dict[int, dict[str, Decision]]] = field(default_factory=list)
    """Per row: id(shadow policy) -> its decisions."""
    detect_seconds: float = 0.0
    row_done: Sequence[bool] | None = None
    """Per row, True once the row has ended (``_Rows.done``): an ended row's reply is no longer watched."""
    reply_fires: int = 0
    """How many categories fired in the reply so far (the block logits processor re-reads its rows when it grows)."""
    calls: int = 0
    _start: int = 0
    _seq: int = 0
    _processed: int = 0
    _plans: dict[tuple[int, str], Any] = field(default_factory=dict)
    _handle: SteeringHandle | None = None
    _target: tuple[torch.device, torch.dtype] = (torch.device("cpu"), torch.float32)
    _watch: dict[int, list[_Watch]] | None = None
    """Per detect layer, the rows whose reply is scored (set up at the first decode step)."""
    _replan: bool = False

    def __post_init__(self) -> None:
        if self.user_mask.shape != self.attention_mask.shape or self.user_mask.shape[0] != len(self.policies):
            raise SteeringError("user_mask, attention_mask and policies must agree on the batch size and prompt length")
        if self.last_turn_mask is None:
            self.last_turn_mask = self.user_mask
        elif self.last_turn_mask.shape != self.user_mask.shape:
            raise SteeringError("last_turn_mask and user_mask must have the same shape")
        if self.shadows is not None and len(self.shadows) != len(self.policies):
            raise SteeringError("shadows must give one (possibly empty) list of policies per row")
        self.decisions = [{} for _ in self.policies]
        self.shadow_decisions = [{} for _ in self.policies]

    @property
    def batch_size(self) -> int:
        return len(self.policies)

    @property
    def prompt_len(self) -> int:
        return int(self.user_mask.shape[1])

    def layers(self) -> set[int]:
        out: set[int] = set()
        for p in self.policies:
            if p is not None:
                out |= p.layers()
        return out | self.shadow_layers()

    def shadow_layers(self) -> set[int]:
        return {layer for row in (self.shadows or ()) for p in row for layer in p.detect_layers}

    def row_state(self, row: int) -> RunState:
        """After prefill, ``row`` as a run of its own (a batch of one) that continues exactly where this one is: the
        row's decisions (and shadows'), its masks in this run's padded positions, the forward count and positions.
        Iteration-level batching decodes each row under its own state (``continuous.py``)."""
        if self.calls > 1:  # 0: no hooks were needed (no policy on any row)
            raise SteeringError(f"a row can be taken out of a run only right after its prefill (this run made {self.calls} forward calls)")
        sl = slice(row, row + 1)
        out = RunState([self.policies[row]], self.user_mask[sl], self.attention_mask[sl],
                       shadows=[self.shadows[row]] if self.shadows is not None else None,
                       last_turn_mask=self.last_turn_mask[sl] if self.last_turn_mask is not None else None)
        out.decisions = [dict(self.decisions[row])]
        out.shadow_decisions = [dict(self.shadow_decisions[row])]
        out.detect_seconds = self.detect_seconds
        out.calls, out._start, out._seq, out._processed, out._target = self.calls, self._start, self._seq, self._processed, self._target
        return out

    def decode_hooks(self) -> dict[int, Any]:
        """A batch-of-one run's hook functions for decode steps, by layer, as ``attach`` would register them (empty
        once the first decode step found nothing that steers or watches generated tokens). Call ``begin_step()``
        before each decode forward."""
        if self.calls >= 2 and not self._watch and not self._steers_generated():
            return {}
        p = self.policies[0]
        detect = set(p.detect_layers) if p is not None else set()
        steer = set(p.steer_layers) if p is not None and p.enforce else set()
        return {layer: self.hook(layer, layer in detect, layer in steer) for layer in sorted(detect | steer)}

    def begin_step(self) -> None:
        """One decode forward of one new position is about to run (what ``attach``'s pre-hook records)."""
        self._begin_call(1)

    def fired(self, row: int) -> list[str]:
        return [c for c, d in self.decisions[row].items() if d.fired]

    def blocked(self, row: int) -> _Category | None:
        """The first fired ``block`` category of an enforcing policy: the row is answered with its message."""
        return _blocking(self.policies[row], self.decisions[row])

    def action(self, row: int) -> str:
        """What happened to ``row``: ``block``, ``refuse``, ``redirect``, ``monitor`` (fired, nothing acted) or ``none``."""
        return _action(self.policies[row], self.decisions[row])

    # ------------------------------------------------------------------------------------------- hooks
    def _begin_call(self, seq: int) -> None:
        """Called once per model forward: which absolute positions does this call cover?"""
        if self.calls == 0 or seq > 1:  # prefill, or a full recompute without a KV cache
            self._start = 0
        else:
            self._start = self._processed
        self._seq = seq
        self._processed = self._start + seq
        self.calls += 1
        if self._replan:  # a category fired in the reply during the last call: it steers from this call on
            self._replan = False
            self._plans = {k: v for k, v in self._plans.items() if k[1] != "generated"}
        if self.calls == 2:
            self._watch = self._watch_setup()
            if seq == 1 and self._handle is not None and not self._watch and not self._steers_generated():
                # decisions are made and nothing steers or watches new tokens: decode at exactly the unsteered cost
                self._handle.remove()

    def _watch_setup(self) -> dict[int, list[_Watch]]:
        """After prefill: per layer and policy, the rows and categories whose reply is scored from now on."""
        groups: dict[tuple[int, int], tuple[_ReplyDetector, list[int]]] = {}
        for row, p in enumerate(self.policies):
            if p is None or not p.reply or self.blocked(row) is not None:
                continue
            for layer, det in p.reply.items():
                groups.setdefault((layer, id(det)), (det, []))[1].append(row)
        out: dict[int, list[_Watch]] = {}
        for (layer, _), (det, rows) in groups.items():
            active = torch.tensor([[not (d := self.decisions[r].get(c.id)) or not d.fired for c in det.categories] for r in rows],
                                  device=det.thresholds.device)
            if active.any():
                index = None if rows == list(range(self.batch_size)) else torch.tensor(rows, device=det.thresholds.device)
                out.setdefault(layer, []).append(_Watch(det, rows, index, active))
        return out

    def _watch_reply(self, layer: int, h: torch.Tensor) -> None:
        """Score the generated tokens of this forward for the watched categories; record the ones that fire."""
        lo = max(self.prompt_len - self._start, 0)
        if lo >= self._seq:
            return
        t0 = time.perf_counter()
        token = self._start + self._seq - 1 - self.prompt_len
        for w in self._watch[layer]:  # type: ignore[index]
            det = w.detector
            x = h[:, lo:] if w.index is None else h[w.index, lo:]
            acts = det.encoder(x).amax(1) if x.shape[1] > 1 else det.encoder(x[:, 0])  # (n, K): max is idempotent, so a recompute is harmless
            w.pooled = acts if w.pooled is None else torch.maximum(w.pooled, acts)
            per_token = acts @ det.w_token
            w.token_max = per_token if w.token_max is None else torch.maximum(w.token_max, per_token)
            scores = torch.where(det.token_cols, w.token_max, w.pooled @ det.w_pool)
            for j, idx in det.max_cols:
                scores[:, j] = w.pooled[:, idx].amax(-1)
            hit = (scores >= det.thresholds) & w.active
            if hit.any():
                self._reply_fired(layer, w, hit, scores, token)
        self.detect_seconds += time.perf_counter() - t0

    def _reply_fired(self, layer: int, w: _Watch, hit: torch.Tensor, scores: torch.Tensor, token: int) -> None:
        # the plans this call may still use are built first: the new responses start with the next call
        for p in {id(p): p for p in self.policies if p is not None and p.enforce}.values():
            for steer_layer in p.steer_layers:
                self._plan(steer_layer, "generated", *self._target)
        for i, j in hit.nonzero().tolist():
            row, c = w.rows[i], w.detector.categories[j]
            w.active[i, j] = False
            if self.row_done is not None and self.row_done[row]:
                continue
            before = self.decisions[row].get(c.id)
            self.decisions[row][c.id] = Decision(c.id, c.label, c.response, float(scores[i, j]), float(c.reply_threshold or 0.0), True, layer,
                                                 c.message, where="reply", token=token, prompt_score=before.score if before else None)
            self.reply_fires += 1
            self._replan = True

    def _steers_generated(self) -> bool:
        layers = {layer for p in self.policies if p is not None and p.enforce for layer in p.steer_layers}
        return any(self._plan(layer, "generated", *self._target) is not None for layer in layers)

    def _detect(self, layer: int, h: torch.Tensor) -> None:
        t0 = time.perf_counter()
        groups: dict[int, tuple[CompiledPolicy, list[tuple[int, dict[str, Decision]]]]] = {}
        for row, p in enumerate(self.policies):
            if p is not None and layer in p.encoders:
                groups.setdefault(id(p), (p, []))[1].append((row, self.decisions[row]))
            for sp in (self.shadows[row] if self.shadows is not None else ()):
                if layer in sp.encoders:
                    sink = self.shadow_decisions[row].setdefault(id(sp), {})
                    groups.setdefault(id(sp), (sp, []))[1].append((row, sink))
        encoded: dict[tuple[Any, ...], torch.Tensor] = {}  # policies over the same pack share their encoder columns
        for p, entries in groups.values():
            rows = tuple(row for row, _ in entries)
            idx = torch.tensor(rows, device=h.device)
            base = {"all": self.user_mask.to(h.device)[idx]}
            if any(c.turns == "last" and c.layer == layer for c in p.categories):
                base["last"] = self.last_turn_mask.to(h.device)[idx]  # type: ignore[union-attr]
            masks = {(t, w): tail_mask(base[t], w) for t, w in {(c.turns, c.window) for c in p.categories if c.layer == layer}}
            enc = p.encoders[layer]
            key = (id(enc._sae), tuple(enc.features), rows)
            if key not in encoded:
                encoded[key] = enc(h[idx])  # (n, P, k)
            acts = encoded[key]
            for c in p.categories:
                if c.layer != layer:
                    continue
                scores = c.score(acts[..., c.index], masks[c.turns, c.window])
                for (_, sink), s in zip(entries, scores.tolist(), strict=True):
                    sink[c.id] = Decision(c.id, c.label, c.response, s, c.threshold, s >= c.threshold, layer, c.message)
        self.detect_seconds += time.perf_counter() - t0

    def steering_categories(self, row: int) -> list[_Category]:
        """The fired categories whose actions steer ``row``. Refusal outranks redirection: when a ``refuse``
        category fired, the ``redirect`` categories that fired too do not steer (their vectors would pull the
        reply back towards answering)."""
        p = self.policies[row]
        if p is None or self.blocked(row) is not None:
            return []
        return _steering(p, self.decisions[row])

    def applied_actions(self, row: int, phase: str | None = None) -> list[tuple[str, _Action]]:
        """(category id, action) for every action that steers ``row`` (in ``phase``, ``prompt`` or ``generated``, when
        given): those of its steering categories, an action that several of them share listed once (it is applied
        once, not summed). A category that fired in the reply steers generated positions only, whatever its actions'
        ``positions`` say (the prompt is past)."""
        if self.policies[row] is None or not self.policies[row].enforce:
            return []
        out: list[tuple[str, _Action]] = []
        seen: set[Any] = set()
        for c in self.steering_categories(row):
            in_reply = self.decisions[row][c.id].where == "reply"
            for a in c.actions:
                if phase is not None and not (phase == "generated" if in_reply else a.positions in (phase, "both")):
                    continue
                if a.spec not in seen:
                    seen.add(a.spec)
                    out.append((c.id, a))
        return out

    def _plan(self, layer: int, phase: str, device: torch.device, dtype: torch.dtype) -> Any:
        """Per-row steering at ``layer`` for ``phase`` ('prompt' or 'generated'), built once per run."""
        key = (layer, phase)
        if key in self._plans:
            return self._plans[key]
        add_rows: list[int] = []
        add_vecs: list[torch.Tensor] = []
        clamps: list[tuple[list[int], _Action]] = []
        for row in range(self.batch_size):
            vec = None
            for _, a in self.applied_actions(row, phase):
                if a.layer != layer:
                    continue
                if a.vector is not None:
                    vec = a.vector if vec is None else vec + a.vector
                else:
                    clamps.append(([row], a))
            if vec is not None:
                add_rows.append(row)
                add_vecs.append(vec)
        plan = None
        if add_rows or clamps:
            add = (torch.tensor(add_rows, device=device), torch.stack(add_vecs).to(device, dtype)) if add_rows else None
            plan = (add, clamps)
        self._plans[key] = plan
        return plan

    def _steer(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        start, seq, prompt = self._start, self._seq, self.prompt_len
        out = h
        for phase in ("prompt", "generated"):
            lo, hi = (start, min(start + seq, prompt)) if phase == "prompt" else (max(start, prompt), start + seq)
            if lo >= hi:
                continue
            plan = self._plan(layer, phase, h.device, h.dtype)
            if plan is None:
                continue
            if out is h:
                out = h.clone()
            sl = slice(lo - start, hi - start)
            add, clamps = plan
            if phase == "prompt":
                posmask = self.attention_mask.to(h.device)[:, lo:hi].unsqueeze(-1).to(h.dtype)  # skip padding
            for rows, a in clamps:
                r = torch.tensor(rows, device=h.device)
                x = h[r, sl]
                f = a.encoder(x).to(h.dtype)  # (n, s, 1), read from the unsteered output
                delta = (a.value - f) * a.dec_row.to(h.dtype)
                if phase == "prompt":
                    delta = delta * posmask[r]
                out[r, sl] += delta
            if add is not None:
                r, vecs = add
                delta = vecs.unsqueeze(1)
                if phase == "prompt":
                    delta = delta * posmask[r]
                out[r, sl] += delta
        return out

    def hook(self, layer: int, detect: bool, steer: bool):
        def fn(module: Any, args: Any, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output
            if h.shape[0] != self.batch_size:
                raise SteeringError(
                    f"steering was set up for {self.batch_size} rows but layer {layer} saw {h.shape[0]}; "
                    "beam search and num_return_sequences > 1 are not supported while steering"
                )
            if self.calls == 1:
                self._target = (h.device, h.dtype)
                if detect:
                    self._detect(layer, h)
            elif self._watch and layer in self._watch:
                self._watch_reply(layer, h)
            if not steer:
                return None
            new = self._steer(layer, h)
            if new is h:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return fn


def _fired(p: CompiledPolicy, decisions: dict[str, Decision]) -> list[_Category]:
    return [c for c in p.categories if (d := decisions.get(c.id)) is not None and d.fired]


def _blocking(p: CompiledPolicy | None, decisions: dict[str, Decision]) -> _Category | None:
    if p is None or not p.enforce:
        return None
    return next((c for c in _fired(p, decisions) if c.response == "block"), None)


def _steering(p: CompiledPolicy, decisions: dict[str, Decision]) -> list[_Category]:
    """Fired categories that steer. Refusal outranks redirection: when a ``refuse`` category fired, the
    ``redirect`` categories that fired too do not steer (their vectors would pull the reply back towards answering)."""
    fired = [c for c in _fired(p, decisions) if c.response in ("refuse", "redirect")]
    if any(c.response == "refuse" for c in fired):
        fired = [c for c in fired if c.response != "redirect"]
    return fired


def _action(p: CompiledPolicy | None, decisions: dict[str, Decision], *, would: bool = False) -> str:
    """``block`` > ``refuse`` > ``redirect`` among fired categories of an enforcing policy; ``monitor`` when
    something fired but nothing acts (monitor mode or ``monitor`` categories); else ``none``. ``would=True``: what
    the policy does when enforced as written (for a shadow, compiled to decide only)."""
    if p is None:
        return "none"
    fired = _fired(p, decisions)
    if not fired:
        return "none"
    if not (p.policy.mode == "enforce" if would else p.enforce):
        return "monitor"
    for response in ("block", "refuse", "redirect"):
        if any(c.response == response for c in fired):
            return response
    return "monitor"


# ---------------------------------------------------------------------------------------- attaching
class SteeringHandle:
    """Hooks registered for one run. ``remove()`` takes every one of them off (idempotent).

    Each hook is recorded *before* it is registered, so an exception or Ctrl-C that lands between torch adding
    the hook and returning its handle still leaves nothing behind: ``remove()`` also sweeps the recorded modules
    for the recorded hook functions."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._pending: list[tuple[torch.nn.Module, Any]] = []

    def _register(self, module: torch.nn.Module, fn: Any, *, pre: bool = False, **kwargs: Any) -> None:
        self._pending.append((module, fn))
        self._handles.append(module.register_forward_pre_hook(fn, **kwargs) if pre else module.register_forward_hook(fn, **kwargs))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._pending:
            module, fn = self._pending.pop()
            # torch keeps hooks in these dicts keyed by handle id; a hook whose handle never reached us is found by identity
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key in [k for k, v in hooks.items() if v is fn]:
                    del hooks[key]
                    for extra in (module._forward_hooks_with_kwargs, module._forward_hooks_always_called, module._forward_pre_hooks_with_kwargs):
                        extra.pop(key, None)


def attach(model: Any, run: RunState, handle: SteeringHandle | None = None) -> SteeringHandle:
    """Register the run's hooks, each tracked in ``handle`` (a new one by default) as it is registered; on any
    failure, the hooks registered so far are removed and it re-raises."""
    handle = handle if handle is not None else SteeringHandle()
    run._handle = handle
    try:
        layers = decoder_layers(model)
        wanted = run.layers()
        if not wanted:
            return handle
        bad = [layer for layer in wanted if not 0 <= layer < len(layers)]
        if bad:
            raise PolicyError(f"layers {bad} do not exist; the model has {len(layers)} decoder layers")

        def count(module: Any, args: Any, kwargs: Any) -> None:
            x = kwargs.get("input_ids")
            if x is None:
                x = kwargs.get("inputs_embeds")
            if x is None and args:
                x = args[0]
            run._begin_call(int(x.shape[1]))

        handle._register(_decoder_stack(model), count, pre=True, with_kwargs=True)
        detect = {layer for p in run.policies if p is not None for layer in p.detect_layers} | run.shadow_layers()
        steer = {layer for p in run.policies if p is not None and p.enforce for layer in p.steer_layers}
        for layer in sorted(wanted):
            if layer in detect or layer in steer:
                handle._register(layers[layer], run.hook(layer, layer in detect, layer in steer))
    except BaseException:
        handle.remove()
        raise
    return handle


@contextmanager
def steering(model: Any, run: RunState) -> Iterator[RunState]:
    """Steer ``model`` for the duration of the block; every hook is removed on every exit path.

    The handle exists before the first hook is registered and registration runs inside the ``try``, so a
    Ctrl-C at any point, even between registering and entering the block, leaves no hook on the model."""
    handle = SteeringHandle()
    try:
        attach(model, run, handle)
        yield run
    finally:
        handle.remove()
