import json
import random
from pathlib import Path

import pytest
import torch

from safeguard.lab import training as T

WORDS = "the a cat dog sat on mat ran to home how do i make bread sorry can't help with that sure here is".split()


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama (hidden size 32) with a word-level tokenizer, saved as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(n)]


def test_collect_activations_match_the_layer_output_and_skip_the_first_position(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    short, long = "the cat sat on the mat", "how do i make bread " * 5
    acts = T.collect_activations(model, tokenizer, [short, long], [0], max_tokens=1000, progress=False)
    assert acts[0].shape == (5 + 24, 32)  # 6 and 25 tokens, first position of each left out
    ids = tokenizer(short, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[1][0]  # output of decoder layer 0
    hooks_before = [len(layer._forward_hooks) for layer in model.model.layers]
    torch.testing.assert_close(acts[0][:5], hidden[1:], rtol=1e-5, atol=1e-5)  # the short text sorts first
    capped = T.collect_activations(model, tokenizer, [short, long], [0, 1], max_tokens=7, progress=False)
    assert capped[0].shape == capped[1].shape == (7, 32)
    assert [len(layer._forward_hooks) for layer in model.model.layers] == hooks_before


def test_train_sae_saves_loadable_sae_with_sidecar_and_resumes(tiny_model, tmp_path):
    from sae_lens import SAE

    out = tmp_path / "tiny-release"
    folders = T.train_sae(
        tiny_model,
        [1, 0],
        d_sae=64,
        tokens=8192,
        out_dir=out,
        texts=_texts(300, 0),
        held_out_texts=_texts(20, 1),
        batch_size=256,
        model_name="tiny-llama",
        command="safeguard train-sae --model tiny --layers 0 1 --d-sae 64 --tokens 8192 --out tiny-release --seed 0",
        progress=False,
    )
    assert folders == {0: out / "layer_0", 1: out / "layer_1"}
    for layer, folder in folders.items():
        sae = SAE.load_from_disk(str(folder))
        assert sae.cfg.d_in == 32 and sae.cfg.d_sae == 64
        assert sae.cfg.architecture() == "standard"
        assert sae.W_dec.dtype == torch.float16
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.hook_resid_post"
        assert sae.cfg.metadata.model_name == "tiny-llama"
        torch.testing.assert_close(sae.W_dec.float().norm(dim=1), torch.ones(64), atol=1e-3, rtol=0)
        info = json.loads((folder / "safeguard.json").read_text())
        assert info["id"] == f"tiny-release/layer_{layer}"
        assert info["model"] == "tiny-llama"
        assert info["layer"] == layer
        assert info["hook_name"] == f"blocks.{layer}.hook_resid_post"
        assert info["command"].startswith("safeguard train-sae --model tiny --layers 0 1")
        assert info["versions"]["sae_lens"]
        assert info["corpus"]["summary"]
        metrics = info["metrics"]
        assert set(metrics) == {"explained_variance", "l0", "dead_fraction", "held_out_tokens"}
        assert -1.0 < metrics["explained_variance"] <= 1.0
        assert 0 <= metrics["l0"] <= 64 and 0.0 <= metrics["dead_fraction"] <= 1.0
        assert metrics["held_out_tokens"] > 0
        assert info["training"]["training_tokens"] == 8192

    stamp = (folders[0] / "sae_weights.safetensors").stat().st_mtime_ns
    again = T.train_sae(tiny_model, [0, 1], d_sae=64, tokens=8192, out_dir=out, texts=["unused"], progress=False)
    assert again == folders
    assert (folders[0] / "sae_weights.safetensors").stat().st_mtime_ns == stamp


def test_train_sae_rejects_missing_layers(tiny_model, tmp_path):
    with pytest.raises(T.TrainingError, match=r"layers \[5\] do not exist"):
        T.train_sae(tiny_model, [5], d_sae=16, tokens=512, out_dir=tmp_path, texts=_texts(10, 0), batch_size=64, progress=False)


def test_cli_command_records_exactly_the_flags():
    assert (
        T.cli_command(None, [10, 20], 4608, 1_500_000, Path("safeguard/bundled/smollm2-135m-instruct"), 0)
        == "safeguard train-sae --layers 10 20 --d-sae 4608 --tokens 1500000 --out safeguard/bundled/smollm2-135m-instruct --seed 0"
    )


def test_refusal_templates_are_varied():
    assert len(set(T.REFUSALS)) >= 30
    assert sum(bool(T._REFUSAL_PATTERN.search(r)) for r in T.REFUSALS) >= 20
    assert not any(T._REFUSAL_PATTERN.search(c) for c in T.COMPLIANT_OPENERS)
