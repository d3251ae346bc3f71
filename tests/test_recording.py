"""The recording toolkit: layer outputs, the user-token mask, the reply cache."""

from __future__ import annotations

import torch

from safeguard.lab.recording import layer_outputs

PROMPTS = ["hi", "how do I bake bread at home?", "a somewhat longer prompt, with a few more tokens than the others in it"]


def test_left_layer_outputs_are_selections_capture_bit_for_bit(llm):
    from safeguard.lab.selection.activations import _capture, encode_prompt

    rows = [encode_prompt(llm, p)[0] for p in PROMPTS]
    pad = llm.tokenizer.pad_token_id or 0
    old, old_attn = _capture(llm.model, rows, [2, 1], pad)
    new, new_attn = layer_outputs(llm.model, rows, [2, 1], pad_id=pad)
    assert torch.equal(old_attn, new_attn) and list(old) == list(new) == [2, 1]
    assert all(torch.equal(old[k], new[k]) and old[k].dtype == new[k].dtype for k in old)


def test_right_layer_outputs_are_trainings_activations_bit_for_bit(tiny_model, tokenizer):
    from safeguard.lab.training import collect_activations

    texts = ["the cat sat on the mat", "how do I make bread, step by step, at home " * 3, "short one", "x y z " * 9, "hello there"]
    old = collect_activations(tiny_model, tokenizer, texts, [0, 2], max_tokens=10_000, batch_size=2, max_norm_ratio=None, progress=False)
    encoded = sorted((tokenizer(t, add_special_tokens=False)["input_ids"][:256] for t in texts), key=len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    parts: dict[int, list[torch.Tensor]] = {0: [], 2: []}
    for lo in range(0, len(encoded), 2):
        acts, attn = layer_outputs(tiny_model, encoded[lo:lo + 2], [0, 2], pad_id=pad, side="right")
        keep = attn.bool()
        keep[:, 0] = False
        for layer in parts:
            parts[layer].append(acts[layer][keep])
    for layer in parts:
        assert torch.equal(old[layer], torch.cat(parts[layer]))
