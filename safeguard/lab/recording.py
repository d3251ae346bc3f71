"""Recording what the model does, for SAE training, feature selection and evaluation alike.

    layer_outputs   one forward pass over padded token rows, stopped after the deepest layer asked for: the output
                    of each decoder layer asked for. Left padding with the positions ``generate`` gives (what the
                    engine sees: selection), or right padding with the model's default positions (training).
    encode_prompt   a chat-formatted prompt's token ids and the mask of the user's tokens, as the engine builds them.
    ReplyCache      the model's greedy replies, one JSON file per generated prompt list with what made them (model,
                    policy identity, max_new_tokens, batch size, torch version): an exact lookup for a prompt list
                    generated in given chunks (evaluation) and a per-prompt lookup over any batching (selection,
                    the training corpus).
    greedy_replies  a ``SteeredLLM``'s greedy replies in chunks of ``batch_size``, read from or written to a ReplyCache.

Reply files are JSON, never pickles: a planted or corrupt file cannot run code; it is logged, ignored and, where its
replies are needed, regenerated and overwritten.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .._hashing import stable_hash as _sha

__all__ = ["REPLY_FORMAT", "Replies", "ReplyCache", "compliance_replies", "encode_prompt", "greedy_replies", "layer_outputs", "reply_key"]

log = logging.getLogger("safeguard")


# ---------------------------------------------------------------------------------------------------------------
# Layer outputs


@torch.inference_mode()
def layer_outputs(model: Any, rows: Sequence[Sequence[int]], layers: Sequence[int], *, pad_id: int,
                  side: Literal["left", "right"] = "left") -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Outputs of decoder ``layers`` for the token ``rows``, padded with ``pad_id`` on ``side``, float32 on the CPU.

    One forward pass serves every layer and stops after the deepest one. ``side="left"`` passes the position ids
    ``generate`` computes for left-padded rows (each row counts from its first real token), so a row reads as the
    engine reads it; ``side="right"`` passes none (the model counts from 0, which is right for right-padded rows).
    Returns ``({layer: (rows, width, d)}, attention mask (rows, width))``; padded positions hold whatever the model
    computed there. No hook is left on the model, whatever happens."""
    from ..runtime.steering import decoder_layers, forward_until, generate_positions

    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    if not rows or not layers:
        raise ValueError("layer_outputs needs at least one row and one layer")
    blocks = decoder_layers(model)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(list(r), dtype=torch.long)
        attn[i, span] = 1
    captured: dict[int, torch.Tensor] = {}

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            captured[layer] = (output[0] if isinstance(output, tuple) else output).float()

        return hook

    dev = model.device
    inputs = {"input_ids": ids.to(dev), "attention_mask": attn.to(dev)}
    if side == "left":
        inputs["position_ids"] = generate_positions(attn).to(dev)
    handles = []
    try:
        for layer in sorted(set(layers)):
            handles.append(blocks[layer].register_forward_hook(hook_for(layer)))
        forward_until(model, blocks[max(layers)], **inputs)
    finally:
        for h in handles:
            h.remove()
    return {layer: captured[layer].cpu() for layer in layers}, attn


def encode_prompt(llm: Any, prompt: Any, *, window: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of a chat-formatted prompt and the mask of the tokens detection reads, exactly as the engine
    builds them: a text is one user turn; a ``Chat`` is read at its last user turn, in context. ``window``: only the
    mask's last ``window`` tokens (``Detect.window``; the engine's ``steering.tail_mask``)."""
    from .selection.data import Chat, model_input

    ids, mask = llm._encode_one(model_input(prompt), True, turns="last") if isinstance(prompt, Chat) else llm._encode_one(prompt, True)
    return ids, tail(mask, window)


def tail(mask: list[bool], window: int | None) -> list[bool]:
    """``mask`` with only its last ``window`` True positions kept (``None``: unchanged): ``steering.tail_mask`` on a list."""
    if window is None:
        return mask
    from ..runtime.steering import tail_mask

    return tail_mask(torch.tensor(mask, dtype=torch.bool), window).tolist()


# ---------------------------------------------------------------------------------------------------------------
# Reply cache

REPLY_FORMAT = "safeguard.replies/1"
"""The ``format`` field of a reply file."""

_LEGACY_MAX_NEW_TOKENS = 40
"""What the replies of the older per-prompt caches (``corpus/replies-*.json``, ``selection/replies-*.json``) were
generated with: both wrote 40 new tokens."""


@dataclass(frozen=True)
class Replies:
    """The model's greedy replies to a prompt list, generated in chunks of ``batch_size``, and what made them."""

    model: str
    prompts: tuple[Any, ...]
    """Texts, or chats as lists of ``{"role", "content"}`` messages."""
    replies: tuple[str, ...]
    max_new_tokens: int
    batch_size: int
    policy: str | None = None
    """The steering policy's identity (a content hash); None for the unsteered model."""
    fired: tuple[tuple[str, ...], ...] | None = None
    """Per reply, the categories that fired (steered replies; for unsteered ones, empty tuples or None)."""
    torch_version: str = torch.__version__

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.replies) or (self.fired is not None and len(self.fired) != len(self.replies)):
            raise ValueError(f"{len(self.prompts)} prompts, {len(self.replies)} replies and "
                             f"{'no' if self.fired is None else len(self.fired)} fired lists do not match")

    @property
    def key(self) -> str:
        return reply_key(self.model, self.prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, policy=self.policy,
                         torch_version=self.torch_version)

    def to_json(self) -> dict[str, Any]:
        return {"format": REPLY_FORMAT, "model": self.model, "policy": self.policy, "max_new_tokens": self.max_new_tokens,
                "batch_size": self.batch_size, "torch": self.torch_version, "prompts": list(self.prompts), "replies": list(self.replies),
                "fired": None if self.fired is None else [list(f) for f in self.fired]}

    @classmethod
    def from_json(cls, data: Any) -> Replies:
        """A reply file's content; ``ValueError`` names what is wrong with anything else."""
        if not isinstance(data, dict) or data.get("format") != REPLY_FORMAT:
            raise ValueError(f"not a {REPLY_FORMAT} reply file")
        prompts, replies, fired = data.get("prompts"), data.get("replies"), data.get("fired")
        if not isinstance(prompts, list) or not isinstance(replies, list) or not all(isinstance(r, str) for r in replies):
            raise ValueError("prompts and replies must be lists, replies of strings")
        if fired is not None and (not isinstance(fired, list) or not all(isinstance(f, list) and all(isinstance(c, str) for c in f) for f in fired)):
            raise ValueError("fired must be a list of lists of category ids")
        for name, kind in (("model", str), ("max_new_tokens", int), ("batch_size", int), ("torch", str)):
            if not isinstance(data.get(name), kind):
                raise ValueError(f"{name} must be a {kind.__name__}")
        if data.get("policy") is not None and not isinstance(data["policy"], str):
            raise ValueError("policy must be a string or null")
        return cls(data["model"], tuple(prompts), tuple(replies), data["max_new_tokens"], data["batch_size"], data.get("policy"),
                   None if fired is None else tuple(tuple(f) for f in fired), data["torch"])


def reply_key(model: str, prompts: Sequence[Any], *, max_new_tokens: int, batch_size: int, policy: str | None = None,
              torch_version: str = torch.__version__) -> str:
    """The file key of a generation run (the key evaluation's reply caches always had, so their files still hit)."""
    which = [] if policy is None else [policy]
    return _sha(model, *which, list(prompts), max_new_tokens, batch_size, torch_version)[:20]


def _prompt_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


class ReplyCache:
    """The model's greedy replies on disk: ``<folder>/{unsteered|steered}-<key>.json``, one file per generation run
    (``Replies.to_json``). ``read_also`` folders are read, never written: older caches whose replies still count
    (evaluation's files by the same name, and the per-prompt ``replies-*.json`` of SAE training's corpus and of
    earlier selections)."""

    def __init__(self, folder: str | os.PathLike[str], *, read_also: Iterable[str | os.PathLike[str]] = ()) -> None:
        self.folder = Path(folder)
        self.read_also = tuple(Path(f) for f in read_also)

    @classmethod
    def default(cls, folder: str | os.PathLike[str] | None = None) -> ReplyCache:
        """The cache in ``folder`` alone, else ``<safeguard cache>/replies``, which also reads the older caches beside
        it (``eval``, ``corpus``, ``selection``)."""
        from ..runtime.models import cache_root

        if folder is not None:
            return cls(folder)
        root = cache_root()
        return cls(root / "replies", read_also=(root / "eval", root / "corpus", root / "selection"))

    def __repr__(self) -> str:
        return f"ReplyCache({str(self.folder)!r})"

    @staticmethod
    def name(key: str, policy: str | None) -> str:
        return f"{'unsteered' if policy is None else 'steered'}-{key}.json"

    def exact(self, model: str, prompts: Sequence[Any], *, max_new_tokens: int, batch_size: int, policy: str | None = None) -> Replies | None:
        """The run that generated exactly ``prompts`` in chunks of ``batch_size`` with these settings, or None."""
        from ._cache import read_json_cache

        key = reply_key(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, policy=policy)
        for folder in (self.folder, *self.read_also):
            data = read_json_cache(folder / self.name(key, policy))
            if data is None:
                continue
            if _is_old_eval(data):  # evaluation's files before this format: their name (the key) vouches for the settings
                data = {**data, "format": REPLY_FORMAT, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "torch": torch.__version__}
            try:
                got = Replies.from_json(data)
            except ValueError as exc:
                log.warning("ignoring the reply cache %s (%s); regenerating it", folder / self.name(key, policy), exc)
                continue
            if (got.model, got.policy, list(got.prompts), got.max_new_tokens, got.batch_size) == (model, policy, list(prompts), max_new_tokens,
                                                                                                 batch_size):
                return got
        return None

    def by_prompt(self, model: str, *, max_new_tokens: int) -> dict[str, str]:
        """Every unsteered reply of ``model`` with ``max_new_tokens`` new tokens, whatever the batching it was generated
        in, by prompt (a chat prompt by its JSON text). Files whose name is not the key of the run they hold are
        skipped. Where runs disagree, the later file (by name) wins; the older caches count before this one."""
        from ._cache import read_json_cache

        known: dict[str, str] = {}
        if max_new_tokens == _LEGACY_MAX_NEW_TOKENS:
            for folder in self.read_also:
                known.update(_legacy_replies(folder, model))
        for f in sorted(self.folder.glob("unsteered-*.json")) if self.folder.is_dir() else []:
            data = read_json_cache(f)
            if data is None:
                continue
            try:
                got = Replies.from_json(data)
            except ValueError:
                continue  # another format (evaluation's older files): exact lookups read those
            if f.name != self.name(got.key, got.policy):
                log.warning("ignoring the reply cache %s: its name is not the key of the run it holds", f)
                continue
            if got.model == model and got.policy is None and got.max_new_tokens == max_new_tokens:
                known.update(zip((_prompt_key(p) for p in got.prompts), got.replies, strict=True))
        return known

    def put(self, replies: Replies) -> Path:
        """Write ``replies`` to its file, atomically; returns the path."""
        path = self.folder / self.name(replies.key, replies.policy)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(replies.to_json(), ensure_ascii=False), encoding="utf-8")
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


def _is_old_eval(data: Any) -> bool:
    return isinstance(data, dict) and "format" not in data and {"model", "prompts", "replies"} <= set(data)


def _legacy_replies(folder: Path, model: str) -> dict[str, str]:
    """Replies of the older per-prompt caches in ``folder``: SAE training's ``{prompt: reply}`` files (their model is
    in the file name) and selection's ``{"model", "prompts", "replies"}`` files."""
    from ._cache import read_json_cache

    known: dict[str, str] = {}
    squashed = model.lower().replace("-", "")
    for f in sorted(folder.glob("replies-*.json")) if folder.is_dir() else []:
        data = read_json_cache(f)
        if not isinstance(data, dict):
            continue
        if isinstance(data.get("prompts"), list):
            if data.get("model", model) == model:
                known.update((p, r) for p, r in zip(data["prompts"], data.get("replies", []), strict=False) if isinstance(p, str) and isinstance(r, str))
        elif squashed in f.name.lower().replace("-", ""):
            known.update((k, v) for k, v in data.items() if isinstance(v, str))
    return known


def greedy_replies(llm: Any, prompts: Sequence[Any], *, cache: ReplyCache, max_new_tokens: int, batch_size: int, policy: Any = None,
                   identity: str | None = None, progress: bool = True, desc: str = "replies") -> Replies:
    """``llm``'s greedy replies to ``prompts``, unsteered when ``policy`` is None, generated in chunks of ``batch_size``
    (``llm.batch``), read from ``cache`` when this exact run is there, else written to it. ``identity`` names the policy
    in the cache (default: its content hash)."""
    from tqdm.auto import tqdm

    who = None if policy is None else identity or policy.content_hash
    prompts = list(prompts)
    hit = cache.exact(llm.model_name, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, policy=who)
    if hit is not None:
        return hit
    texts: list[str] = []
    fired: list[tuple[str, ...]] = []
    for lo in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress):
        results = llm.batch(prompts[lo:lo + batch_size], steer=policy is not None, policy=policy, max_new_tokens=max_new_tokens, batch_size=batch_size)
        texts += [r.text for r in results]
        fired += [tuple(r.report.fired) for r in results]
    out = Replies(llm.model_name, tuple(prompts), tuple(texts), max_new_tokens, batch_size, who, tuple(fired))
    cache.put(out)
    return out


def compliance_replies(llm: Any, prompts: Sequence[str], *, max_new_tokens: int = 40, batch_size: int = 8, progress: bool = True,
                       cache: ReplyCache | None = None) -> list[str]:
    """The unsteered model's greedy replies to ``prompts`` (what it says when it complies), each read from any run in
    ``cache`` (default: ``ReplyCache.default()``, which holds SAE training's corpus replies too) whatever its batching;
    the missing ones are generated in chunks of ``batch_size`` and written there as one run."""
    cache = cache or ReplyCache.default()
    known = cache.by_prompt(llm.model_name, max_new_tokens=max_new_tokens)
    todo = [p for p in dict.fromkeys(prompts) if _prompt_key(p) not in known]
    if todo:
        run = greedy_replies(llm, todo, cache=cache, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, desc="Compliance replies")
        known.update(zip((_prompt_key(p) for p in todo), run.replies, strict=True))
    return [known[_prompt_key(p)] for p in prompts]
