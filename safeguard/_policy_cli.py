"""``safeguard policy``: list, show, diff and check policies against a detector pack, without loading a model."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import typer

from ._options import exit_on_error

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Read, compare and check policies (no model is loaded).")

PolicyArg = Annotated[str, typer.Argument(help="A shipped policy's name (default, eu, us) or a policy file.")]
PackOpt = Annotated[str | None, typer.Option(help="Detector pack: a shipped pack's id or a pack.yaml (default: the embedded model's).")]


def _pack(spec: str | None) -> Any:
    from .errors import PolicyError
    from .runtime.pack import Pack, bundled_packs
    from .runtime.saes import BUNDLED_RELEASE

    want = spec or BUNDLED_RELEASE
    for pack in bundled_packs():
        if pack.id == want:
            return pack
    if spec is None:
        raise PolicyError(f"the embedded model's pack {want!r} is not installed; pass --pack")
    if "/" not in spec and not spec.endswith((".yaml", ".yml")):
        raise PolicyError(f"no shipped pack has id {spec!r}; shipped: {[p.id for p in bundled_packs()]}; or give a pack.yaml path")
    return Pack.load(spec)


def _resolved(policy: str, pack: str | None) -> Any:
    from .runtime.compile import resolve
    from .runtime.policy import Policy

    return resolve(Policy.load(policy), _pack(pack))


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def _sens(c: Any) -> str:
    return c.sensitivity.replace("max_fpr=", "fpr<=")


def _rows(r: Any) -> dict[str, dict[str, Any]]:
    return {c.id: {"response": c.response, "sensitivity": c.sensitivity, "threshold": round(c.threshold, 5), "fpr": c.fpr, "recall": c.recall,
                   "message": c.message, "note": c.note} for c in r.categories}


def _header(r: Any) -> list[str]:
    p, k = r.policy, r.pack
    chain = " <- ".join(f.rsplit("/", 1)[-1] for f, _ in p.chain) if p.chain else "(built in code)"
    lines = [f"policy {p.name} {p.version}  hash {r.hash[:12]}  mode {p.mode}  taxonomy {p.taxonomy.name} {p.taxonomy.version}",
             f"  files: {chain}"]
    if p.description:
        lines.append(f"  {p.description}")
    if k is not None:
        state = "measured" if k.measured else "NOT MEASURED: thresholds are guesses"
        lines.append(f"pack {k.id}  hash {k.short_hash}  model {k.model}  sae {k.sae}  {state}")
    return lines


@app.command("list")
def list_() -> None:
    """The policies and detector packs that ship with safeguard."""
    from .runtime.pack import bundled_packs
    from .runtime.policy import Policy, shipped_policies

    with exit_on_error():
        typer.echo("policies (use them by name: use_policy('eu'), --policy eu):")
        for name in shipped_policies():
            p = Policy.load(name)
            ext = f" extends {p.extends}" if p.extends else ""
            typer.echo(f"  {name:<10} {p.version:<8}{ext:<17} {p.description}")
        typer.echo("detector packs:")
        for k in bundled_packs():
            typer.echo(f"  {k.id:<24} {k.model} / {k.sae}, {len(k.categories)} categories, " + ("measured" if k.measured else "NOT MEASURED"))


@app.command()
def show(policy: PolicyArg, pack: PackOpt = None, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The policy as it runs (its extends chain merged) against a pack: per category its response, sensitivity,
    threshold, and the false-positive rate and recall the pack measured at that threshold."""

    with exit_on_error():
        r = _resolved(policy, pack)
    if as_json:
        typer.echo(json.dumps({"policy": r.policy.name, "version": r.policy.version, "hash": r.hash, "mode": r.policy.mode,
                               "pack": r.pack.id if r.pack else None, "categories": _rows(r)}, indent=1))
        return
    for line in _header(r):
        typer.echo(line)
    off = [c for c in r.policy.categories if c not in {x.id for x in r.categories}]
    typer.echo(f"\n{'category':<22}{'response':<10}{'sensitivity':<13}{'threshold':>10}{'FPR':>8}{'recall':>8}  note")
    for c in r.categories:
        note = c.note or (f'message: "{c.message}"' if c.message else "")
        typer.echo(f"{c.id:<22}{c.response:<10}{_sens(c):<13}{c.threshold:>10.3f}{_pct(c.fpr):>8}{_pct(c.recall):>8}  {note}")
    for c in off:
        typer.echo(f"{c:<22}{'off':<10}{'':<13}{'':>10}{'':>8}{'':>8}  {r.policy.categories[c].note or ''}")
    typer.echo("\nFPR: share of validation benign prompts the category fires on; recall: share of its validation harmful prompts.")


@app.command()
def diff(a: PolicyArg, b: PolicyArg, pack: PackOpt = None) -> None:
    """What changes between two deployments' policies, in words and numbers (exit 0 either way)."""

    with exit_on_error():
        ra, rb = _resolved(a, pack), _resolved(b, pack)
    pa, pb = ra.policy, rb.policy
    typer.echo(f"{pa.name} {pa.version} ({ra.hash[:12]})  ->  {pb.name} {pb.version} ({rb.hash[:12]})" + (f"  on pack {ra.pack.id}" if ra.pack else ""))
    lines = []
    if pa.mode != pb.mode:
        lines.append(f"mode: {pa.mode} -> {pb.mode}")
    xa, xb = _rows(ra), _rows(rb)
    for cid in list(dict.fromkeys([*pa.categories, *pb.categories])):
        ca, cb = xa.get(cid), xb.get(cid)
        if ca == cb:
            continue
        if ca is None or cb is None:
            c = cb or ca
            lines.append(f"{cid}: " + (f"enforced ({c['response']}, {c['sensitivity']})" if ca is None else "no longer enforced (off)"))
            continue
        parts = []
        if ca["response"] != cb["response"]:
            parts.append(f"response {ca['response']} -> {cb['response']}")
        if ca["sensitivity"] != cb["sensitivity"] or ca["threshold"] != cb["threshold"]:
            parts.append(f"sensitivity {ca['sensitivity']} -> {cb['sensitivity']} (threshold {ca['threshold']:.3f} -> {cb['threshold']:.3f}; "
                         f"measured FPR {_pct(ca['fpr'])} -> {_pct(cb['fpr'])}, recall {_pct(ca['recall'])} -> {_pct(cb['recall'])})")
        if ca["message"] != cb["message"] and cb["message"]:
            parts.append(f'message "{cb["message"]}"')
        if ca["note"] != cb["note"] and cb["note"]:
            parts.append(f"note: {cb['note']}")
        lines.append(f"{cid}: " + "; ".join(parts))
    typer.echo("\n".join(f"  {x}" for x in lines) if lines else "  no difference in behaviour")


@app.command()
def check(policies: Annotated[list[str], typer.Argument(help="Policy names or files.")],
          pack: Annotated[list[str] | None, typer.Option(help="Pack(s) to check against (repeat; default: the embedded model's).")] = None) -> None:
    """Validate policies against packs without generating. Exit 0 when every one is valid, 1 otherwise (for CI)."""
    from .errors import SafeguardError

    bad = 0
    for policy in policies:
        for spec in pack or [None]:
            try:
                r = _resolved(policy, spec)
            except SafeguardError as exc:
                bad += 1
                typer.echo(f"FAIL {policy}" + (f" on {spec}" if spec else "") + f": {exc}")
                continue
            typer.echo(f"ok   {policy}: {r.policy.name} {r.policy.version} ({r.hash[:12]}), {len(r.categories)} categories enforced"
                       + (f" on pack {r.pack.id}" if r.pack else ""))
    raise typer.Exit(1 if bad else 0)
