"""Graded responses and shadow policies through every interface: block answers with a message and decodes
nothing for that row, monitor reports without acting, shadow policies are scored from the same activations."""

from __future__ import annotations

import pytest
import torch
from _tiny import LAYERS, hooks_on, make_sae, policy_v2, write_tiny_pack

from safeguard import Policy, SteeredLLM
from safeguard.runtime.models import LoadedModel
from safeguard.runtime.saes import SAESet

KW = {"max_new_tokens": 6}
BLOCK = "Blocked by policy."


@pytest.fixture
def packed(tiny_model, tokenizer, saes, tmp_path):
    """The tiny model with the tiny pack; no active policy."""
    loaded = LoadedModel(model=tiny_model, tokenizer=tokenizer, name="tiny-llama", source="test", quantization=None)
    return SteeredLLM(loaded, saes, None, pack=write_tiny_pack(tmp_path / "pack"))


def pol(**cats) -> Policy:
    return Policy.from_dict({**policy_v2(**cats), "defaults": {"message": BLOCK}})


def test_block_answers_with_the_message_and_generates_nothing(packed):
    r = packed.generate("hello there", policy=pol(cyber={"response": "block"}), **KW)
    assert r.text == BLOCK and r.completion_tokens == 0 and r.finish_reason == "content_filter"
    assert r.report.action == "block" and r.report.blocked and r.report.message == BLOCK and r.report.fired == ("cyber",)
    assert r.report.applied == () and r.report.pack_id == "tiny-pack"
    own = packed.generate("hello there", policy=pol(cyber={"response": "block", "message": "Own words."}), **KW)
    assert own.text == "Own words."


def test_a_mixed_batch_decodes_the_other_rows_unchanged(packed):
    blocking = pol(cyber={"response": "block"})
    never = pol(cyber={"sensitivity": "relaxed"})  # relaxed: cyber never fires
    prompts = ["hello there", "what is two plus two"]
    solo = packed.generate(prompts[1], policy=never, **KW)
    rows = packed.batch(prompts, policies=[blocking, never], **KW)
    assert rows[0].text == BLOCK and rows[0].report.blocked
    assert rows[1].text == solo.text and rows[1].completion_tokens == solo.completion_tokens > 0 and rows[1].report.action == "none"


def test_stream_yields_the_block_message(packed):
    s = packed.stream("hello there", policy=pol(cyber={"response": "block"}), **KW)
    assert list(s) == [BLOCK] and s.result.report.blocked
    assert hooks_on(packed.model) == 0


async def test_async_and_chat_block_too(packed):
    blocking = pol(cyber={"response": "block"})
    assert (await packed.agenerate("hello there", policy=blocking, **KW)).text == BLOCK
    assert packed.chat([{"role": "user", "content": "hi"}], policy=blocking, **KW).text == BLOCK
    assert [p async for p in packed.astream("hello there", policy=blocking, **KW)] == [BLOCK]


def test_monitor_categories_report_and_leave_the_reply_bit_for_bit(packed):
    plain = packed.generate("hello there", steer=False, **KW)
    r = packed.generate("hello there", policy=pol(cyber={"response": "monitor"}), **KW)
    assert r.report.fired == ("cyber",) and r.report.action == "monitor" and r.report.applied == ()
    assert r.text == plain.text
    refused = packed.generate("hello there", policy=pol(cyber={}), **KW)
    assert refused.report.action == "refuse" and refused.report.applied and refused.text != plain.text


def test_shadow_policies_are_scored_and_never_act(packed):
    main = pol(cyber={"sensitivity": "relaxed"})  # fires nothing
    shadow = pol(cyber={"response": "block"})
    plain = packed.generate("hello there", steer=False, **KW)
    r = packed.generate("hello there", policy=main, shadow=[shadow], **KW)
    assert r.text == plain.text and r.report.fired == () and r.report.action == "none"
    (sh,) = r.report.shadow
    alone = packed.generate("hello there", policy=shadow, **KW).report
    assert sh.policy_name == "tiny2" and sh.action == "block" and sh.fired == ("cyber",)
    assert [(d.category, d.score, d.fired) for d in sh.decisions] == [(d.category, d.score, d.fired) for d in alone.decisions]
    assert r.report.to_dict()["shadow"][0]["fired"] == ["cyber"]


def test_a_policy_names_its_own_shadows(packed, tmp_path):
    import yaml

    (tmp_path / "eu.yaml").write_text(yaml.safe_dump({**policy_v2(cyber={"response": "block"}), "name": "shadowed"}))
    main = tmp_path / "main.yaml"
    main.write_text(yaml.safe_dump({**policy_v2(cyber={"sensitivity": "relaxed"}), "shadow": ["eu.yaml"]}))
    rows = packed.batch(["hello there", "hi"], policy=main, **KW)
    assert all(r.report.shadow[0].policy_name == "shadowed" and r.report.shadow[0].action == "block" for r in rows)
    assert all(not r.report.blocked for r in rows)
    rep = packed.classify(["hello there"], policy=main)[0]
    assert rep.shadow[0].fired == ("cyber",)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**policy_v2(), "shadow": ["../elsewhere.yaml"]}))
    from safeguard import PolicyError

    with pytest.raises(PolicyError, match="outside the file's folder"):
        packed.generate("hi", policy=bad, **KW)


def test_policy_names_work_everywhere_a_policy_is_accepted(tokenizer):
    """Shipped names resolve in use_policy, generate, batch and classify (they need the embedded pack's model
    name: a tiny model named after it, with random SAEs of the bundled shape, runs the same compiled policies)."""
    import torch
    from _tiny import make_tiny_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from safeguard.runtime.pack import find_pack

    pack = find_pack("SmolLM2-135M-Instruct", "smollm2-135m-instruct")
    if pack is None:
        pytest.skip("the embedded model's pack is not built yet")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=576, intermediate_size=64, num_hidden_layers=21, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = 2
    saes = SAESet([make_sae(layer, release="smollm2-135m-instruct", model_name="SmolLM2-135M-Instruct", d_in=576, d_sae=4608)
                   for layer in (10, 20)])
    llm = SteeredLLM(LoadedModel(model=model, tokenizer=tokenizer, name="SmolLM2-135M-Instruct", source="test", quantization=None), saes, "eu")
    assert llm.policy.name == "eu" and llm.pack.id == "smollm2-135m-instruct"
    assert llm.use_policy("us").name == "us"
    rows = llm.batch(["hi", "hello"], policies=["eu", "default"], max_new_tokens=2)
    assert [r.report.policy_name for r in rows] == ["eu", "default"] and rows[0].report.pack_id == "smollm2-135m-instruct"
    assert llm.classify(["hi"], policy="eu", shadow=["us"])[0].shadow[0].policy_name == "us"
    del make_tiny_model


def test_llama3_pack_structure_on_a_tiny_random_llama(tokenizer):
    """The shipped Llama-3-8B-Instruct pack (layer 25, llama-3-8b-it-res-jh, feature 35831) compiles the same eu
    policy on a tiny random Llama-architecture model with a random gated SAE of the same shape at layer 25."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from safeguard import PolicyError

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=26, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = 2
    sae = make_sae(25, arch="gated", release="llama-3-8b-it-res-jh", model_name="meta-llama/Meta-Llama-3-8B-Instruct", d_in=32, d_sae=65536)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, name="Meta-Llama-3-8B-Instruct", source="test", quantization=None)
    llm = SteeredLLM(loaded, SAESet([sae]), "eu")
    assert llm.pack.id == "llama-3-8b-it-res-jh" and not llm.pack.measured
    compiled = llm.compile_policy("eu")
    assert compiled.detect_layers == [25] and compiled.steer_layers == [25]
    r = llm.generate("hello there", max_new_tokens=3)
    assert r.report.pack_id == "llama-3-8b-it-res-jh" and {d.layer for d in r.report.decisions} == {25} and len(r.report.decisions) == 12
    with pytest.raises(PolicyError, match="ships no redirect vectors"):
        llm.use_policy("us")
    assert llm.policy.name == "eu"  # a failed swap changes nothing
    assert LAYERS == 4
