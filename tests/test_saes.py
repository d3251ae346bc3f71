"""Loading SAEs: from disk, from sae-lens' registry (offline: fast, clear errors), hook names."""

from __future__ import annotations

import time

import pytest
from _tiny import make_sae

from safeguard import SAEError
from safeguard.runtime.saes import layer_of_hook, load_sae, load_saes


def test_hook_names_map_to_layer_outputs():
    assert layer_of_hook("blocks.25.hook_resid_post") == 25
    assert layer_of_hook("blocks.25.hook_resid_pre") == 24
    assert layer_of_hook("model.layers.10") == 10
    for bad in ("blocks.0.hook_resid_pre", "blocks.3.attn.hook_z", "embed"):
        with pytest.raises(SAEError, match="supported"):
            layer_of_hook(bad)


def test_disk_round_trip_with_sidecar(tmp_path):
    import json

    import torch

    s = make_sae(2, seed=5)
    s.sae.save_model(str(tmp_path / "layer_2"))
    (tmp_path / "layer_2" / "safeguard.json").write_text(json.dumps({"release": "my-release", "model": "tiny-llama"}))
    loaded = load_sae(tmp_path / "layer_2")
    assert (loaded.layer, loaded.release, loaded.model_name, loaded.d_sae) == (2, "my-release", "tiny-llama", 64)
    x = torch.randn(3, 32)
    torch.testing.assert_close(loaded.sae.encode(x), s.sae.encode(x))
    assert list(load_saes([tmp_path / "layer_2"])) == [2]


def test_bad_disk_folders(tmp_path):
    with pytest.raises(SAEError, match="no cfg.json"):
        load_sae(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAEError, match="could not load the SAE"):
        load_sae(tmp_path)
    with pytest.raises(SAEError, match="does not exist"):
        load_sae("some/missing/folder")


def test_registry_errors_are_fast_and_helpful(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SAEError, match="Valid IDs are"):
        load_sae("llama-3-8b-it-res-jh:blocks.3.hook_resid_post")
    with pytest.raises(SAEError, match="not in sae-lens' registry"):
        load_sae("no-such-release")
    t = time.perf_counter()
    with pytest.raises(SAEError, match="huggingface-cli download Juliushanhanhan/llama-3-8b-it-res"):
        load_sae("llama-3-8b-it-res-jh")
    assert time.perf_counter() - t < 5


def test_offline_hub_model_fails_fast_with_instructions(monkeypatch):
    from safeguard import ModelLoadError
    from safeguard.runtime.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(ModelLoadError, match="huggingface-cli download meta-llama/Meta-Llama-3-8B-Instruct"):
        load_model("meta-llama/Meta-Llama-3-8B-Instruct")
    assert time.perf_counter() - t < 5
    with pytest.raises(ModelLoadError, match="quantization='3bit'"):
        load_model(None, quantization="3bit")


def test_a_folder_of_layer_folders_loads_every_layer(tmp_path):
    for layer in (1, 2):
        make_sae(layer, seed=layer, model_name=None).sae.save_model(str(tmp_path / f"layer_{layer}"))
    with pytest.warns(UserWarning, match="does not declare its model"):
        saes = load_saes(tmp_path)
        assert sorted(saes) == [1, 2]
        saes[1].check_fits("tiny-llama", 32, 4)
