"""Producing replies: unsteered and steered generation in identical batches, cached, judged into an ``EvalResult``."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import EvaluationError
from ..refusal import PhraseJudge, RefusalJudge, prompt_text
from . import baselines as bl
from .baselines import BASELINES
from .report import DEFAULT_CRITERIA, BaselineReply, Criteria, EvalResult, Reply
from .sets import HARMFUL_SOURCES, EvalSets, _check_count, answer_correct

__all__ = ["evaluate", "steered_replies", "unsteered_replies"]

log = logging.getLogger("safeguard")


def unsteered_replies(llm: Any, prompts: list[str], *, max_new_tokens: int = 48, batch_size: int = 8, cache_dir: str | Path | None = None,
                      progress: bool = True, desc: str = "unsteered") -> list[str]:
    """The unsteered model's greedy replies, generated in chunks of ``batch_size`` (the chunks the steered run
    uses) and cached under a key of the model, prompts and settings."""
    return [t for t, _ in _replies(llm, prompts, None, max_new_tokens=max_new_tokens, batch_size=batch_size, cache_dir=cache_dir,
                                   progress=progress, desc=desc)]


def steered_replies(llm: Any, prompts: list[str], policy: Any, *, max_new_tokens: int = 48, batch_size: int = 8, cache_dir: str | Path | None = None,
                    progress: bool = True, desc: str = "steered", identity: str | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """(reply, fired categories) under ``policy`` for each prompt, generated in chunks of ``batch_size`` and cached
    under a key of the model, ``identity`` (default: the policy's content hash; pass the hash of the policy joined
    with its detector pack when the pack decides thresholds or actions), the prompts and settings (an interrupted
    or widened evaluation reuses what it already generated)."""
    return _replies(llm, prompts, policy, max_new_tokens=max_new_tokens, batch_size=batch_size, cache_dir=cache_dir, progress=progress, desc=desc,
                    identity=identity)


def _replies(llm: Any, prompts: list[str], policy: Any, *, max_new_tokens: int, batch_size: int, cache_dir: str | Path | None, progress: bool,
             desc: str, identity: str | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """Greedy (reply, fired) per prompt, unsteered when ``policy`` is None: the exact run (these prompts in these
    chunks) from the reply cache in ``cache_dir`` (default: the safeguard cache's), else generated and written there."""
    from ..recording import ReplyCache, greedy_replies

    run = greedy_replies(llm, prompts, cache=ReplyCache.default(cache_dir), max_new_tokens=max_new_tokens, batch_size=batch_size, policy=policy,
                         identity=identity, progress=progress, desc=desc)
    fired = run.fired if run.fired is not None else ((),) * len(prompts)
    return list(zip(run.replies, fired, strict=True))


def _groups(sets: EvalSets) -> list[tuple[str, list[Any], list[str]]]:
    """(set name, prompts, categories); a prompt is a text, or for the multi-turn sets a list of chat messages."""
    def texts(name: str, rows: list[Any]) -> tuple[str, list[Any], list[str]]:
        return name, [p.text for p in rows], [p.category for p in rows]

    def chats(name: str, rows: list[Any]) -> tuple[str, list[Any], list[str]]:
        return name, [[{"role": m["role"], "content": m["content"]} for m in c.messages] for c in rows], [c.category for c in rows]

    return [
        texts("harmful", sets.harmful),
        texts("benign", sets.benign),
        texts("risky", sets.risky),
        texts("benign_blind", sets.benign_blind),
        texts("risky_blind", sets.risky_blind),
        ("capability", [q for q, _ in sets.capability], ["capability"] * len(sets.capability)),
        ("jailbreak", [c.text for c in sets.jailbreak], [c.category for c in sets.jailbreak]),
        ("jailbreak_benign", [c.text for c in sets.jailbreak_benign], [c.category for c in sets.jailbreak_benign]),
        texts("risky_eval", sets.risky_eval),
        texts("harmful_plain", sets.harmful_plain),
        texts("airt", sets.airt),
        chats("multiturn_benign", sets.multiturn_benign),
        chats("multiturn_harmful", sets.multiturn_harmful),
    ]


def _sources(sets: EvalSets, name: str) -> list[str | None]:
    rows = getattr(sets, name, None)
    if name == "capability" or not isinstance(rows, list):
        return [None] * (len(sets.capability) if name == "capability" else 0)
    return [getattr(r, "source", None) for r in rows]


def _shown(prompt: Any) -> str:
    """A conversation as one line: ``user: ... | assistant: ... | user: ...``."""
    return prompt if isinstance(prompt, str) else " | ".join(f"{m['role']}: {m['content']}" for m in prompt)


def evaluate(
    llm: Any,
    policy: Any,
    sets: EvalSets,
    *,
    judge: RefusalJudge | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    flag_replies: bool = True,
    compare_parent: bool = True,
    criteria: Criteria = DEFAULT_CRITERIA,
    command: str = "",
    baselines: Sequence[str] = (),
    baseline_n: int | None = None,
    direction_prompts: Sequence[str] | None = None,
) -> EvalResult:
    """Generate unsteered and steered replies for every set and judge them.

    ``policy`` is a ``Policy``, a shipped policy's name or a path; it is resolved against the model's detector pack
    (``llm.pack``, else the shipped pack for the model and SAE) to report per category what it states. Unsteered
    and steered replies are cached per set in ``cache_dir`` (default: the safeguard cache) under a key of the model,
    the policy (joined with the pack when the pack decides), the prompts and settings, so evaluating several
    policies generates the unsteered replies once, and a run that was stopped resumes.
    ``flag_replies``: run the policy's detectors over the replies to harmful prompts (``SteeredLLM.classify``,
    the reply as the text): a proxy for whether a reply still carries the harmful content, which is how
    redirected replies (neither refusals nor the original answer) are judged.
    ``compare_parent``: for a policy that ``extends`` another, the parent's decisions on every prompt
    (``classify``, no generation), so the report shows the two side by side where they differ.
    ``criteria``: the pass/fail thresholds the report checks and labels.
    ``baselines``: names of ``baselines.BASELINES`` to run on the first ``baseline_n`` prompts of every set (all when
    None; capability questions excepted), with the same judge; ``direction_prompts`` replaces the train-split prompts
    the ``dense_direction`` baseline's direction is computed from.
    """
    import torch

    from ...runtime.policy import Policy

    _check_count("max_new_tokens", max_new_tokens, 1)
    _check_count("batch_size", batch_size, 1)
    baselines = _check_baselines(baselines)
    if baseline_n is not None:
        _check_count("baseline_n", baseline_n, 1)
    pol = Policy.load(policy)
    pack = _pack_of(llm)
    resolved = _resolve(pol, pack)
    identity = resolved.hash if pack is not None and _uses_pack(pol, resolved) else None
    parent_pol = _parent_of(pol) if compare_parent else None
    judge = judge or PhraseJudge()
    replies: list[Reply] = []
    generated: list[tuple[str, list[Any], list[str]]] = []
    for name, prompts, cats in _groups(sets):
        if not prompts:
            continue
        plain = unsteered_replies(llm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, cache_dir=cache_dir,
                                  progress=progress, desc=f"unsteered: {name}")
        steered = steered_replies(llm, prompts, pol, max_new_tokens=max_new_tokens, batch_size=batch_size, cache_dir=cache_dir, progress=progress,
                                  desc=f"policy {pol.name}: {name}", identity=identity)
        texts = [t for t, _ in steered]
        generated.append((name, prompts, plain))
        judged = [prompt_text(p) for p in prompts]
        ref_u = judge.judge(judged, plain)
        ref_s = judge.judge(judged, texts)
        flags_u: list[tuple[str, ...] | None] = [None] * len(prompts)
        flags_s: list[tuple[str, ...] | None] = [None] * len(prompts)
        if flag_replies and name == "harmful":
            both = [t if t.strip() else "(empty)" for t in plain + texts]
            flagged = [r.fired for r in llm.classify(both, policy=pol, batch_size=batch_size)]
            flags_u, flags_s = flagged[:len(prompts)], flagged[len(prompts):]
        by_parent: list[tuple[str, ...] | None] = [None] * len(prompts)
        if parent_pol is not None:
            by_parent = [tuple(r.fired) for r in llm.classify(prompts, policy=parent_pol, batch_size=batch_size)]
        sources = _sources(sets, name)
        at_prompt = [tuple(r.fired) for r in llm.classify(prompts, policy=pol, batch_size=batch_size)]  # prefill only: the rest fired in the reply
        for i, prompt in enumerate(prompts):
            correct_u = correct_s = None
            if name == "capability":
                patterns = sets.capability[i][1]
                correct_u, correct_s = answer_correct(plain[i], patterns), answer_correct(texts[i], patterns)
            wrapped = {"jailbreak": sets.jailbreak, "jailbreak_benign": sets.jailbreak_benign}.get(name)
            shown = f"[{wrapped[i].template}] {wrapped[i].prompt}" if wrapped else _shown(prompt)  # templates are long
            replies.append(Reply(name, cats[i], shown, plain[i], texts[i], bool(ref_u[i]), bool(ref_s[i]),
                                 steered[i][1], correct_u, correct_s, flags_u[i], flags_s[i], by_parent[i],
                                 sources[i] if name in HARMFUL_SOURCES else None, at_prompt[i]))
    extra = _baseline_replies(llm, pol, resolved, generated, baselines, judge=judge, n=baseline_n, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, cache_dir=cache_dir, progress=progress, direction_prompts=direction_prompts)
    info = {**_policy_info(pol, resolved, pack), "source": str(policy) if not isinstance(policy, Policy) else "<object>"}
    parent = None
    if parent_pol is not None:
        parent = _policy_info(parent_pol, _resolve(parent_pol, pack), pack)
    settings = {
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "decoding": "greedy",
        "judge": type(judge).__name__,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if baselines:
        settings.update(baselines=list(baselines), baseline_n=baseline_n, **extra.pop("settings"))
    return EvalResult(info, llm.model_name, replies, sets.description, settings, command=command,
                      date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), criteria=criteria, parent=parent,
                      baselines=extra.get("rows", []))


def _check_baselines(names: Any) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out = tuple(n.strip() for n in names)
    bad = [n for n in out if n not in BASELINES]
    if bad:
        raise EvaluationError(f"unknown baseline {bad[0]!r}; the baselines are {', '.join(BASELINES)}")
    return tuple(dict.fromkeys(out))


def _baseline_replies(llm: Any, pol: Any, resolved: Any, generated: list[tuple[str, list[Any], list[str]]], names: Sequence[str], *, judge: RefusalJudge,
                      n: int | None, max_new_tokens: int, batch_size: int, cache_dir: str | Path | None, progress: bool,
                      direction_prompts: Sequence[str] | None) -> dict[str, Any]:
    """Each baseline's replies to the first ``n`` prompts of every set but the capability questions (see ``baselines``)."""
    if not names:
        return {}
    groups = [(name, prompts[:n], plain[:n]) for name, prompts, plain in generated if name != "capability"]
    rows: list[BaselineReply] = []
    settings: dict[str, Any] = {}
    dense = None
    if "dense_direction" in names:
        layer, positions, strength = bl.refusal_norm(llm, resolved)
        vectors = bl.dense_refusal_direction(llm, layer, prompts=direction_prompts, cache_dir=cache_dir, progress=progress)
        dense = bl.dense_policy(pol, resolved, vectors, layer=layer, strength=strength, positions=positions)
        dense_resolved = _resolve(dense, _pack_of(llm))
        settings["dense_direction"] = {"layer": layer, "strength": round(strength, 4), "positions": positions, "vector_file": vectors.name,
                                       "direction_prompts": "given" if direction_prompts is not None else "train split, select part (selection_data)"}
    for name, prompts, plain in groups:
        shown = [prompt_text(p) for p in prompts]
        for b in names:
            if b == "system_prompt":
                out = unsteered_replies(llm, [bl.with_system_prompt(p) for p in prompts], max_new_tokens=max_new_tokens, batch_size=batch_size,
                                        cache_dir=cache_dir, progress=progress, desc=f"system_prompt: {name}")
                fired: list[tuple[str, ...]] = [()] * len(prompts)
            elif b == "self_check":
                blocked = bl.self_check_blocked(llm, prompts, batch_size=batch_size)
                out = [bl.BLOCK_MESSAGE if x else t for x, t in zip(blocked, plain, strict=True)]
                fired = [("self_check",) if x else () for x in blocked]
            else:
                both = steered_replies(llm, prompts, dense, max_new_tokens=max_new_tokens, batch_size=batch_size, cache_dir=cache_dir, progress=progress,
                                       desc=f"dense_direction: {name}", identity=dense_resolved.hash)
                out, fired = [t for t, _ in both], [f for _, f in both]
            refused = judge.judge(shown, out)
            rows += [BaselineReply(b, name, i, out[i], bool(refused[i]), tuple(fired[i])) for i in range(len(prompts))]
    settings["system_prompt"] = bl.SAFETY_SYSTEM_PROMPT if "system_prompt" in names else None
    settings["self_check"] = {"prompt": bl.SELF_CHECK_PROMPT, "block_message": bl.BLOCK_MESSAGE} if "self_check" in names else None
    return {"rows": rows, "settings": {"baseline_settings": {k: v for k, v in settings.items() if v is not None}}}


def _pack_of(llm: Any) -> Any:
    """The detector pack the model runs with: its own, else the shipped one for its model and SAE release (or None)."""
    pack = getattr(llm, "pack", None)
    if pack is not None:
        return pack
    from ...runtime.pack import find_pack

    saes = getattr(llm, "saes", None) or {}
    release = next(iter(saes.values())).release if saes else None
    return find_pack(llm.model_name, release)


def _resolve(pol: Any, pack: Any) -> Any:
    from ...runtime.compile import resolve

    return resolve(pol, pack)


def _uses_pack(pol: Any, resolved: Any) -> bool:
    """Whether the pack decides anything for this policy (a threshold, refusal actions or a redirect vector)."""
    return any(pol.rule(c.id).detect is None or pol.rule(c.id).steer is None for c in resolved.categories)


def _parent_of(pol: Any) -> Any:
    """The policy ``pol`` extends (a path relative to its file, or a shipped name), or None."""
    from ...runtime.policy import Policy

    if not pol.extends:
        return None
    near = Path(pol.base_dir or ".") / pol.extends
    return Policy.load(near if near.is_file() else pol.extends)


def _policy_info(pol: Any, resolved: Any, pack: Any) -> dict[str, Any]:
    """What a report says about a policy: its identity, its pack's, and per enforced category its stated operating point."""
    cats = {c.id: {"response": c.response, "sensitivity": c.sensitivity, "threshold": c.threshold, "fpr": c.fpr, "recall": c.recall,
                   "detect": c.detect.model_dump(mode="json", exclude={"threshold"})} for c in resolved.categories}
    return {
        "name": pol.name,
        "version": pol.version,
        "hash": pol.short_hash,
        "extends": pol.extends,
        "pack": {"id": pack.id, "hash": pack.short_hash, "measured": pack.measured} if pack is not None else None,
        "resolved_hash": resolved.hash[:12],
        "taxonomy": f"{pol.taxonomy.name} {pol.taxonomy.version}",
        "enforced": [c.id for c in resolved.categories if c.response != "monitor"],
        "monitored": [c.id for c in resolved.categories if c.response == "monitor"],
        "responses": {c.id: c.response for c in resolved.categories},
        "categories": cats,
        "mode": pol.mode,
    }

