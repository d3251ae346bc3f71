"""``safeguard eval``: the command line of an evaluation."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from ... import _options as opt
from .report import DEFAULT_CRITERIA, Criteria, _tables, write_report
from .run import _check_baselines, evaluate
from .sets import eval_sets

__all__ = ["eval_command"]


def eval_command(
    policy: Annotated[str, typer.Argument(help="Policy to evaluate: a shipped policy's name (default, eu, us) or a policy file.")],
    out: Annotated[Path | None, typer.Option(help="Report folder (default: docs/eval/<policy name>).")] = None,
    model: opt.Model = None,
    sae: opt.Sae = None,
    pack: Annotated[Path | None, typer.Option(help="Detector pack (default: the one shipped for the model and SAE).")] = None,
    quantization: opt.Quantization = None,
    device: opt.Device = None,
    n_harmful: Annotated[int, typer.Option(help="Held-out harmful prompts.")] = 240,
    n_benign: Annotated[int, typer.Option(help="Held-out benign prompts.")] = 80,
    n_risky: Annotated[int, typer.Option(help="Held-out risky-looking benign prompts.")] = 40,
    n_blind_benign: Annotated[int, typer.Option(help="Benign prompts of the evaluation-only harmless set.")] = 160,
    n_blind_risky: Annotated[int, typer.Option(help="Risky-looking prompts of the evaluation-only harmless set.")] = 80,
    n_capability: Annotated[int, typer.Option(help="Capability questions (at most 30).")] = 30,
    n_jailbreak: Annotated[int, typer.Option(help="Jailbreak-wrapped harmful prompts (held-out templates).")] = 40,
    n_jailbreak_benign: Annotated[int, typer.Option(help="Jailbreak-wrapped benign prompts (held-out templates).")] = 20,
    n_risky_eval: Annotated[int, typer.Option(help="Risky-looking benign prompts of the project's risky set (eval part).")] = 80,
    n_harmful_plain: Annotated[int, typer.Option(help="Plain-worded harmful prompts (eval part).")] = 80,
    n_airt: Annotated[int, typer.Option(help="PyRIT AI red-team seed prompts (evaluation only).")] = 80,
    n_multiturn_benign: Annotated[int, typer.Option(help="Benign multi-turn conversations (eval part).")] = 40,
    n_multiturn_harmful: Annotated[int, typer.Option(help="Harmful requests split across turns (eval part).")] = 40,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per reply (greedy).")] = 48,
    batch_size: Annotated[int, typer.Option(help="Rows per generate call.")] = 8,
    seed: Annotated[int, typer.Option(help="Sampling seed of the held-out prompts.")] = 0,
    min_harmful_increase: Annotated[float, typer.Option(help="Criterion: harmful refusal rises by at least this.")] = DEFAULT_CRITERIA.harmful_increase_min,
    max_benign_increase: Annotated[float, typer.Option(help="Criterion: benign refusal rises by at most this.")] = DEFAULT_CRITERIA.benign_increase_max,
    min_benign_identical: Annotated[float, typer.Option(help="Criterion: share of benign replies identical.")] = DEFAULT_CRITERIA.benign_identical_min,
    min_source_harmful_increase: Annotated[float, typer.Option(help="Criterion: harmful refusal rises by at least this in every held-out source.")
                                           ] = DEFAULT_CRITERIA.source_harmful_increase_min,
    max_risky_increase: Annotated[float, typer.Option(help="Criterion: risky-looking benign refusal rises by at most this.")
                                  ] = DEFAULT_CRITERIA.risky_increase_max,
    max_multiturn_benign_increase: Annotated[float, typer.Option(help="Criterion: benign multi-turn refusal rises by at most this.")
                                             ] = DEFAULT_CRITERIA.multiturn_benign_increase_max,
    max_wrapped_benign_increase: Annotated[float, typer.Option(help="Criterion: refusal of benign prompts in jailbreak templates rises by at most this.")
                                           ] = DEFAULT_CRITERIA.wrapped_benign_increase_max,
    min_multiturn_harmful_increase: Annotated[float, typer.Option(help="Criterion: refusal of harmful requests split across turns rises by at least this.")
                                              ] = DEFAULT_CRITERIA.multiturn_harmful_increase_min,
    compare_parent: Annotated[bool, typer.Option(help="For a policy that extends another: the parent's decisions on the same prompts.")] = True,
    baselines: Annotated[str, typer.Option(help="Comma-separated baselines on the same prompts and judge: system_prompt, self_check, "
                                                "dense_direction (each costs a generation pass; default none).")] = "",
    baseline_n: Annotated[int, typer.Option(help="Prompts per set the baselines answer (the first of each set).")] = 40,
    threads: opt.Threads = 1,
) -> None:
    """Measure a policy on held-out prompts: safety, over-refusal, identical replies, capability, jailbreaks."""
    import torch

    torch.set_num_threads(threads)
    from ...runtime.llm import SteeredLLM
    from ...runtime.policy import Policy

    with opt.exit_on_error():
        pol = Policy.load(policy)
        command = "safeguard eval " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "eval" else ""
        if not command:
            command = _reconstruct(policy, out, model, sae, pack, quantization, n_harmful, n_benign, n_risky, n_blind_benign, n_blind_risky,
                                   n_capability, n_jailbreak, n_jailbreak_benign, max_new_tokens, batch_size, seed, baselines, baseline_n,
                                   {"n-risky-eval": n_risky_eval, "n-harmful-plain": n_harmful_plain, "n-airt": n_airt,
                                    "n-multiturn-benign": n_multiturn_benign, "n-multiturn-harmful": n_multiturn_harmful})
        # the sets before the model: bad counts fail at once
        sets = eval_sets(n_harmful=n_harmful, n_benign=n_benign, n_risky=n_risky, n_blind_benign=n_blind_benign, n_blind_risky=n_blind_risky,
                         n_capability=n_capability, n_jailbreak=n_jailbreak, n_jailbreak_benign=n_jailbreak_benign, n_risky_eval=n_risky_eval,
                         n_harmful_plain=n_harmful_plain, n_airt=n_airt, n_multiturn_benign=n_multiturn_benign, n_multiturn_harmful=n_multiturn_harmful,
                         seed=seed)
        criteria = Criteria(min_harmful_increase, max_benign_increase, min_benign_identical, min_source_harmful_increase, max_risky_increase,
                            max_multiturn_benign_increase, max_wrapped_benign_increase, min_multiturn_harmful_increase)
        _check_baselines(baselines)
        llm = SteeredLLM.from_pretrained(model, sae=(list(sae) if sae else None), policy=None, pack=pack, quantization=quantization, device=device)
        names = _check_baselines(baselines)
        result = evaluate(llm, policy, sets, max_new_tokens=max_new_tokens, batch_size=batch_size, command=command, criteria=criteria,
                          compare_parent=compare_parent, baselines=names, baseline_n=baseline_n)
    folder = out or Path("docs") / "eval" / pol.name
    paths = write_report(result, folder)
    s = result.summary()
    typer.echo(f"report: {paths['markdown']} ({paths['html'].name}, {paths['json'].name})")
    for title, head, rows in [t for t in _tables(result) if not t[0].startswith(("Share of prompts", "Harmful prompts by category"))]:
        typer.echo(f"\n{title}")
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
        for row in [head, *rows]:
            typer.echo("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    typer.echo(f"\ncriteria {'met' if s['criteria']['passed'] else 'missed'}")


def _reconstruct(policy: str, out: Path | None, model: str | None, sae: list[str] | None, pack: Path | None, quantization: str | None, n_harmful: int,
                 n_benign: int, n_risky: int, n_blind_benign: int, n_blind_risky: int, n_capability: int, n_jailbreak: int,
                 n_jailbreak_benign: int, max_new_tokens: int, batch_size: int, seed: int, baselines: str = "", baseline_n: int = 40,
                 later: dict[str, int] | None = None) -> str:
    args = ["safeguard", "eval", str(policy)]
    if out is not None:
        args += ["--out", str(out)]
    if model is not None:
        args += ["--model", model]
    for s in sae or []:
        args += ["--sae", s]
    if pack is not None:
        args += ["--pack", str(pack)]
    if quantization is not None:
        args += ["--quantization", quantization]
    args += ["--n-harmful", str(n_harmful), "--n-benign", str(n_benign), "--n-risky", str(n_risky), "--n-blind-benign", str(n_blind_benign),
             "--n-blind-risky", str(n_blind_risky), "--n-capability", str(n_capability),
             "--n-jailbreak", str(n_jailbreak), "--n-jailbreak-benign", str(n_jailbreak_benign), "--max-new-tokens", str(max_new_tokens),
             "--batch-size", str(batch_size), "--seed", str(seed)]
    for flag, value in (later or {}).items():
        args += [f"--{flag}", str(value)]
    if baselines:
        args += ["--baselines", baselines, "--baseline-n", str(baseline_n)]
    return " ".join(shlex.quote(a) for a in args)

