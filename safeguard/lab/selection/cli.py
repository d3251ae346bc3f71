"""``safeguard select`` and ``safeguard features``."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from ... import _options as opt
from ...errors import SelectionError
from .method import select
from .sweep import over_budget
from .tables import render_table


def _floats(text: str, option: str = "--strengths") -> list[float]:
    out = []
    for x in text.replace(",", " ").split():
        try:
            out.append(float(x))
        except ValueError:
            raise SelectionError(f"{option}: {x!r} is not a number; give comma-separated numbers such as '0.5,1.0'") from None
    if not out:
        raise SelectionError(f"{option}: no numbers in {text!r}; give comma-separated numbers such as '0.5,1.0'")
    return out



_REGIONS = ("Regions are policy edits now: select writes one detector pack per model and SAE, and a policy (policies/*.yaml) says per "
            "category `response: redirect|block|monitor|off` and `sensitivity: relaxed|standard|strict`; see docs/policies.md.")


def select_command(
    out: Annotated[Path, typer.Option(help="Detector pack to write (YAML), e.g. safeguard/bundled/<sae>/pack.yaml; its vectors and provenance "
                                           "go beside it.")],
    pack_id: Annotated[str | None, typer.Option("--id", help="Pack id (default: the SAE release).")] = None,
    description: Annotated[str, typer.Option(help="Pack description.")] = "",
    category: Annotated[list[str] | None, typer.Option(help="Detect this category (repeat). Default: every category with enough prompts.")] = None,
    model: opt.Model = None,
    sae: opt.Sae = None,
    quantization: opt.Quantization = None,
    device: opt.Device = None,
    detect_layer: Annotated[int, typer.Option(help="Layer whose SAE detects categories.")] = 10,
    steer_layer: Annotated[int, typer.Option(help="Layer whose SAE features steer refusals.")] = 20,
    n_detect_features: Annotated[int | None, typer.Option(help="Fix the features per category detector (default: chosen by leave-one-source-out "
                                                                "validation among select.DETECT_CONFIGS).")] = None,
    n_detect_candidates: Annotated[int | None, typer.Option(help="Fix the candidate features per category the probe starts from (default: "
                                                                  "chosen with the above).")] = None,
    detect_l2: Annotated[float | None, typer.Option(min=0.0, help="Fix the probes' L2 penalty (with --n-detect-*: one configuration; "
                                                                  "default 0.01).")] = None,
    shared_harm: Annotated[float, typer.Option(min=0.0, help="Add to every category's detector a shared any-harm probe (every category's "
                                                             "positives vs harmless), at this share of the category score's spread; 0: none.")] = 0.0,
    shared_features: Annotated[int, typer.Option(min=1, help="Features the shared any-harm probe keeps.")] = 256,
    shared_l2: Annotated[float, typer.Option(min=0.0, help="The shared any-harm probe's L2 penalty.")] = 0.1,
    shared_wrapped: Annotated[bool, typer.Option(help="Fit the shared probe on jailbreak-wrapped positives too (default: plain ones, the "
                                                      "wrapped ones only scored).")] = False,
    styles: Annotated[bool, typer.Option(help="Add the selection-only sets harmful_styles.jsonl and risky_benign_more.jsonl to the data "
                                              "(docs/eval/ceiling.md).")] = False,
    n_steer_features: Annotated[int, typer.Option(help="Distinct refusal features to steer with.")] = 3,
    strengths: Annotated[str, typer.Option(help="Strengths to sweep, x typical residual norm (comma-separated).")] = "0.5,0.75,1.0,1.25,1.5",
    strength: Annotated[float | None, typer.Option(help="Use this strength and sweep nothing else.")] = None,
    causal_strength: Annotated[float, typer.Option(help="Strength of the causal check, x residual norm.")] = 1.0,
    positions: Annotated[str, typer.Option(help="Where refusal features are added: prompt, generated or both.")] = "prompt",
    threshold_margin: Annotated[float | None, typer.Option(help="Fix the standard level's margin (share of the gap harmless max to category median).")] = None,
    max_val_fpr: Annotated[float, typer.Option(help="Standard level: most validation harmless prompts allowed to fire any category (fraction).")] = 0.02,
    min_margin: Annotated[float, typer.Option(help="Smallest margin the per-category choice may reach.")] = 0.0,
    relax_margin: Annotated[float, typer.Option(help="Relaxed level: its margin above the standard one.")] = 0.5,
    strict_fpr: Annotated[float, typer.Option(help="Strict level: share of calibration benign prompts allowed to fire a category.")] = 0.01,
    max_benign_increase: Annotated[float, typer.Option(help="Sweep: most benign refusal increase allowed (fraction).")] = 0.04,
    redirect_strength: Annotated[float, typer.Option(help="Strength of redirect vectors.")] = 1.0,
    refusal_style: Annotated[str, typer.Option(help="How the pack refuses: features (SAE refusal features) or dense (the dense refusal "
                                                      "direction).")] = "features",
    opener: Annotated[str | None, typer.Option(help="A refusal opener forced as the first tokens of refusing rows.")] = None,
    after_opener: Annotated[str, typer.Option(help="After the opener: steer (the model goes on, steered) or end (the reply is the opener "
                                                    "alone).")] = "steer",
    reply_detection: Annotated[bool, typer.Option(help="Calibrate per-category reply thresholds (detection while the reply is written).")] = True,
    n_reply_benign: Annotated[int, typer.Option(help="Select-part harmless prompts whose unsteered replies place the reply thresholds.")] = 160,
    reply_margin: Annotated[float, typer.Option(help="Reply thresholds: share of the gap from the highest benign reply score to the median "
                                                     "harmful one.")] = 0.2,
    detect_reduce: Annotated[str, typer.Option(help="Detection pooling over the user's tokens: max or mean.")] = "max",
    window: Annotated[int | None, typer.Option(min=1, help="Detection reads only the last this many user tokens (where a jailbreak "
                                                            "template puts the request it wraps); default: every user token.")] = None,
    n_wrapped_harmful: Annotated[int, typer.Option(help="Select-part harmful prompts wrapped in train jailbreak templates (detection positives).")] = 200,
    n_wrapped_harmless: Annotated[int | None, typer.Option(help="Select-part harmless prompts wrapped in train jailbreak templates (detection "
                                                                 "negatives; default: the harmful ones' rate).")] = None,
    n_val_harmful: Annotated[int, typer.Option(help="Validation harmful prompts in the sweep.")] = 32,
    n_val_benign: Annotated[int, typer.Option(help="Validation benign prompts in the sweep.")] = 32,
    tables: Annotated[Path | None, typer.Option(help="Folder for features.csv/json and the sweep plot (default: <out dir>/selection).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the select/validation split and the samples.")] = 0,
    threads: opt.Threads = 1,
    name: Annotated[str | None, typer.Option(hidden=True)] = None,
    redirect: Annotated[list[str] | None, typer.Option(hidden=True)] = None,
    strict: Annotated[list[str] | None, typer.Option(hidden=True)] = None,
    disable: Annotated[list[str] | None, typer.Option(hidden=True)] = None,
) -> None:
    """Choose SAE features (detect per category, refusal steering), calibrate sensitivity levels, sweep the strength, write a detector pack."""
    gone = [flag for flag, v in (("--name", name), ("--redirect", redirect), ("--strict", strict), ("--disable", disable)) if v]
    if gone:
        typer.echo(f"safeguard select: {', '.join(gone)} no longer exist{'s' if len(gone) == 1 else ''}. {_REGIONS}", err=True)
        raise typer.Exit(2)
    torch.set_num_threads(threads)
    from ...runtime.llm import SteeredLLM

    command = "safeguard select " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "select" else ""
    with opt.exit_on_error():
        sweep = _floats(strengths)  # before the model loads: a typo fails at once
        llm = SteeredLLM.from_pretrained(model, sae=(list(sae) if sae else None), policy=None, quantization=quantization, device=device)
        res = select(llm, out=out, categories=category or None, pack_id=pack_id, description=description, detect_layer=detect_layer,
                     steer_layer=steer_layer, n_detect_features=n_detect_features, n_detect_candidates=n_detect_candidates,
                     detect_l2=detect_l2, shared_harm=shared_harm, shared_features=shared_features, shared_l2=shared_l2, shared_wrapped=shared_wrapped,
                     styles=styles,
                     n_steer_features=n_steer_features, strengths=sweep, strength=strength, causal_strength=causal_strength, positions=positions,
                     threshold_margin=threshold_margin, max_val_fpr=max_val_fpr, min_margin=min_margin, relax_margin=relax_margin, strict_fpr=strict_fpr,
                     max_benign_increase=max_benign_increase, redirect_strength=redirect_strength, detect_reduce=detect_reduce,
                     detect_window=window,
                     reply_detection=reply_detection, n_reply_benign=n_reply_benign, reply_margin=reply_margin,
                     refusal_style=refusal_style, opener=opener, after_opener=after_opener,
                     n_wrapped_harmful=n_wrapped_harmful, n_wrapped_harmless=n_wrapped_harmless, n_val_harmful=n_val_harmful, n_val_benign=n_val_benign,
                     tables=tables, seed=seed, command=command)
    c = res.chosen
    typer.echo(f"pack: {res.files['pack']} ({res.pack!r}); vectors {res.files['vectors'].name}, provenance {res.files['provenance'].name}")
    typer.echo(f"chosen strength {c.strength:g}: validation harmful refused {c.harmful_refusal:.0%} (unsteered {res.baseline['harmful_refusal']:.0%}), "
               f"benign refused {c.benign_refusal:.0%} (unsteered {res.baseline['benign_refusal']:.0%}), benign identical {c.benign_identical:.0%}")
    harms = over_budget(c, res.baseline["benign_refusal"], max_benign_increase=max_benign_increase)
    if harms:
        typer.echo(f"warning: at strength {c.strength:g} on the validation part, " + "; ".join(harms)
                   + (" (a fixed --strength is not chosen by the sweep)" if strength is not None else " (no swept strength kept within the budget)"),
                   err=True)
    typer.echo(render_levels(res.pack))
    typer.echo(f"tables: {res.files['csv']}, sweep plot: {res.files['sweep_png']}")


def render_levels(pack: Any) -> str:
    """Per category, each level's threshold with the false-positive rate and recall measured on validation prompts."""
    def cell(p: Any) -> str:
        rate = "n/a" if p.fpr is None else f"{p.fpr:.1%}"
        rec = "n/a" if p.recall is None else f"{p.recall:.0%}"
        return f"{p.threshold:>9.4f} fpr {rate:>5} recall {rec:>4}"

    width = max(len(c) for c in pack.categories)
    lines = [f"{'category':<{width}}  " + "  ".join(f"{lv:<30}" for lv in ("relaxed", "standard", "strict"))]
    for cid, pc in pack.categories.items():
        lines.append(f"{cid:<{width}}  " + "  ".join(f"{cell(pc.levels[lv]):<30}" for lv in ("relaxed", "standard", "strict")))
    return "\n".join(lines)


def features_command(
    table: Annotated[Path, typer.Argument(help="features.json written by safeguard select (or its folder).")],
    category: Annotated[str | None, typer.Option(help="Only this category ('refusal' for the steer features).")] = None,
    top: Annotated[int, typer.Option(help="Rows per category.")] = 10,
) -> None:
    """Show the top features per category and their statistics from a selection table."""
    path = table / "features.json" if table.is_dir() else table
    if not path.is_file():
        typer.echo(f"{path} does not exist; safeguard select writes it (see --tables)", err=True)
        raise typer.Exit(1)
    data = json.loads(path.read_text())
    rows = data.get("rows", [])
    if category is not None and not any(r["category"] == category for r in rows):
        typer.echo(f"no rows for category {category!r}; categories: {sorted({r['category'] for r in rows})}", err=True)
        raise typer.Exit(1)
    meta = data.get("meta", {})
    if meta:
        typer.echo(" ".join(f"{k}={v}" for k, v in meta.items()))
    typer.echo(render_table(rows, category=category, top=top))

