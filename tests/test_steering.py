"""Exact-tensor tests of the hook math on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch
from _tiny import HIDDEN, hooks_on, make_sae, policy_dict

from safeguard import Policy
from safeguard.runtime.saes import SAESet
from safeguard.runtime.steering import CompiledPolicy, RunState, attach, steering

B, P = 3, 7


def compile_policy(saes, **kw) -> CompiledPolicy:
    return CompiledPolicy(Policy.from_dict(policy_dict(**kw)), saes, model_name="tiny-llama", num_layers=4,
                          device=torch.device("cpu"), dtype=torch.float32)


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (B, P), generator=g)
    attn = torch.ones(B, P, dtype=torch.long)
    return ids, attn


def layer_outputs(model, ids, attn, run: RunState | None):
    """Outputs of every decoder layer (after any steering) and the logits of one prefill forward."""
    seen: dict[int, torch.Tensor] = {}

    def forward():
        handles = [layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone()))
                   for i, layer in enumerate(model.model.layers)]  # registered after steering's, so they see its result
        try:
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=attn).logits
        finally:
            for h in handles:
                h.remove()

    if run is None:
        return seen, forward()
    with steering(model, run):
        return seen, forward()


def test_add_is_exactly_the_unit_decoder_row_times_strength(tiny_model, saes):
    p = compile_policy(saes, steer=[{"kind": "add", "layer": 2, "feature": 7, "strength": 4.0, "positions": "prompt"}])
    ids, attn = inputs()
    base, _ = layer_outputs(tiny_model, ids, attn, None)
    # steer only layer 2's output; layer 2's own input is unchanged, so compare at layer 2 itself
    run = RunState([p] * B, torch.ones(B, P, dtype=torch.bool), attn)
    steered, _ = layer_outputs(tiny_model, ids, attn, run)
    row = saes[2].sae.W_dec[7].detach()
    vec = row / row.norm() * 4.0
    assert torch.equal(steered[1], base[1])  # before the steer layer nothing changes
    assert torch.equal(steered[2], base[2] + vec)


def test_strength_zero_is_the_unsteered_model(tiny_model, saes):
    p = compile_policy(saes, steer=[{"kind": "add", "layer": 2, "feature": 7, "strength": 0.0}])
    ids, attn = inputs()
    _, base = layer_outputs(tiny_model, ids, attn, None)
    run = RunState([p] * B, torch.ones(B, P, dtype=torch.bool), attn)
    _, steered = layer_outputs(tiny_model, ids, attn, run)
    assert torch.equal(base, steered)
    assert all(run.fired(r) == ["cyber"] for r in range(B))  # it did fire; the strength made it a no-op


def test_rows_that_do_not_fire_are_bit_identical(tiny_model, saes):
    fire = compile_policy(saes, threshold=-1.0)
    never = compile_policy(saes, threshold=1e9)
    ids, attn = inputs(1)
    _, base = layer_outputs(tiny_model, ids, attn, None)
    run = RunState([never, fire, None], torch.ones(B, P, dtype=torch.bool), attn)
    _, steered = layer_outputs(tiny_model, ids, attn, run)
    assert torch.equal(steered[0], base[0])
    assert not torch.equal(steered[1], base[1])
    assert torch.equal(steered[2], base[2])
    assert run.fired(0) == [] and run.fired(1) == ["cyber"] and run.decisions[2] == {}


def test_clamp_sets_the_feature_through_its_decoder_row(tiny_model, saes):
    p = compile_policy(saes, steer=[{"kind": "clamp", "layer": 2, "feature": 11, "value": 5.0}])
    ids, attn = inputs(2)
    base, _ = layer_outputs(tiny_model, ids, attn, None)
    run = RunState([p] * B, torch.ones(B, P, dtype=torch.bool), attn)
    steered, _ = layer_outputs(tiny_model, ids, attn, run)
    f = saes[2].sae.encode(base[2])[..., 11:12]
    expected = base[2] + (5.0 - f) * saes[2].sae.W_dec[11].detach()
    torch.testing.assert_close(steered[2], expected, rtol=0, atol=1e-6)


def test_detection_score_is_max_over_user_tokens_of_max_over_features(tiny_model, saes):
    p = compile_policy(saes, threshold=1e9, features=(3, 5, 9))
    ids, attn = inputs(3)
    user = torch.zeros(B, P, dtype=torch.bool)
    user[:, 2:5] = True
    base, _ = layer_outputs(tiny_model, ids, attn, None)
    run = RunState([p] * B, user, attn)
    layer_outputs(tiny_model, ids, attn, run)
    acts = saes[1].sae.encode(base[1])[..., [3, 5, 9]].amax(-1)[:, 2:5].amax(-1)
    got = torch.tensor([run.decisions[r]["cyber"].score for r in range(B)])
    torch.testing.assert_close(got, acts, rtol=1e-6, atol=1e-6)


def test_padding_is_not_steered_on_prompt_positions(tiny_model, saes):
    p = compile_policy(saes, steer=[{"kind": "add", "layer": 2, "feature": 7, "strength": 4.0, "positions": "prompt"}])
    ids, attn = inputs(4)
    attn[0, :3] = 0
    base, _ = layer_outputs(tiny_model, ids, attn, None)
    run = RunState([p] * B, attn.bool(), attn)
    steered, _ = layer_outputs(tiny_model, ids, attn, run)
    assert torch.equal(steered[2][0, :3], base[2][0, :3])
    assert not torch.equal(steered[2][0, 3:], base[2][0, 3:])


def test_generated_positions_only_leave_the_prefill_alone(tiny_model, saes):
    p = compile_policy(saes, steer=[{"kind": "add", "layer": 2, "feature": 7, "strength": 8.0, "positions": "generated"}])
    ids, attn = inputs(5)
    run = RunState([p] * B, torch.ones(B, P, dtype=torch.bool), attn)
    _, base_logits = layer_outputs(tiny_model, ids, attn, None)
    _, prefill_logits = layer_outputs(tiny_model, ids, attn, run)
    assert torch.equal(base_logits, prefill_logits)
    plain = tiny_model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=6, do_sample=False, pad_token_id=2)
    run = RunState([p] * B, torch.ones(B, P, dtype=torch.bool), attn)
    with steering(tiny_model, run):
        steered = tiny_model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert torch.equal(plain[:, : P + 1], steered[:, : P + 1])  # first new token comes from the unsteered prefill
    assert not torch.equal(plain, steered)


def test_monitor_mode_decides_but_never_steers(tiny_model, saes):
    p = compile_policy(saes, mode="monitor")
    ids, attn = inputs(6)
    _, base = layer_outputs(tiny_model, ids, attn, None)
    run = RunState([p] * B, torch.ones(B, P, dtype=torch.bool), attn)
    _, steered = layer_outputs(tiny_model, ids, attn, run)
    assert torch.equal(base, steered)
    assert run.fired(0) == ["cyber"]


def test_vector_action_adds_the_stored_vector(tiny_model, saes, tmp_path):
    from safetensors.torch import save_file

    vec = torch.randn(HIDDEN)
    save_file({"cyber": vec}, str(tmp_path / "v.safetensors"))
    d = policy_dict(steer=[{"kind": "vector", "layer": 3, "file": "v.safetensors", "key": "cyber", "strength": 0.5}])
    p = CompiledPolicy(Policy.from_dict(d, base_dir=str(tmp_path)), saes, model_name="tiny-llama", num_layers=4,
                       device=torch.device("cpu"), dtype=torch.float32)
    ids, attn = inputs(7)
    base, _ = layer_outputs(tiny_model, ids, attn, None)
    # layer 3 is the last decoder layer; feed it the same input by comparing its output delta only
    run = RunState([p] * B, torch.ones(B, P, dtype=torch.bool), attn)
    steered, _ = layer_outputs(tiny_model, ids, attn, run)
    assert torch.equal(steered[3], base[3] + vec * 0.5)


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu"])
def test_feature_encoder_matches_the_full_sae(arch):
    s = make_sae(1, arch=arch, seed=4)
    if arch == "jumprelu":
        with torch.no_grad():
            s.sae.threshold.abs_()
    x = torch.randn(5, 9, HIDDEN)
    ids = [0, 7, 13, 63]
    torch.testing.assert_close(s.encoder(ids)(x), s.sae.encode(x)[..., ids], rtol=1e-5, atol=1e-6)


def test_hooks_are_removed_on_every_exit_path(tiny_model, saes):
    p = compile_policy(saes)
    _, attn = inputs()
    assert hooks_on(tiny_model) == 0
    run = RunState([p] * B, torch.ones(B, P, dtype=torch.bool), attn)
    with pytest.raises(ZeroDivisionError), steering(tiny_model, run):
        assert hooks_on(tiny_model) == 3  # the call counter, detect at 1, steer at 2
        1 / 0  # noqa: B018
    assert hooks_on(tiny_model) == 0
    with pytest.raises(KeyboardInterrupt), steering(tiny_model, RunState([p] * B, torch.ones(B, P, dtype=torch.bool), attn)):
        raise KeyboardInterrupt
    assert hooks_on(tiny_model) == 0


def test_attach_unwinds_what_it_registered_when_it_fails(tiny_model, saes, monkeypatch):
    p = compile_policy(saes)
    _, attn = inputs()
    layers = tiny_model.model.layers
    original = type(layers[2]).register_forward_hook

    def boom(self, *a, **k):
        if self is layers[2]:
            raise RuntimeError("registration failed")
        return original(self, *a, **k)

    monkeypatch.setattr(type(layers[2]), "register_forward_hook", boom)
    with pytest.raises(RuntimeError, match="registration failed"):
        attach(tiny_model, RunState([p] * B, torch.ones(B, P, dtype=torch.bool), attn))
    assert hooks_on(tiny_model) == 0


def test_sae_set_refuses_two_saes_on_one_layer():
    from safeguard import SAEError

    with pytest.raises(SAEError, match="two SAEs read layer 1"):
        SAESet([make_sae(1), make_sae(1, seed=3)])


def test_an_action_shared_by_two_fired_categories_is_applied_once(tiny_model, saes):
    from safeguard.runtime.report import SteeringReport

    act = {"kind": "add", "layer": 2, "feature": 7, "strength": 4.0, "positions": "prompt"}
    cats = [{"id": cid, "label": cid, "detect": {"layer": 1, "features": [3], "threshold": -1.0}, "steer": [act]} for cid in ("a", "b")]
    p = compile_policy(saes, categories=cats)
    ids, attn = inputs()
    base, _ = layer_outputs(tiny_model, ids, attn, None)
    run = RunState([p] * B, torch.ones(B, P, dtype=torch.bool), attn)
    steered, _ = layer_outputs(tiny_model, ids, attn, run)
    row = saes[2].sae.W_dec[7].detach()
    assert torch.equal(steered[2], base[2] + row / row.norm() * 4.0)
    report = SteeringReport.from_run(run, 0, 0.0)
    assert report.fired == ("a", "b") and len(report.applied) == 1


@pytest.mark.parametrize(("positions", "threshold", "hooks_during_decode"),
                         [("prompt", -1.0, 1), ("both", 1e9, 1), ("generated", -1.0, 4), ("both", -1.0, 4)])
def test_decode_runs_hook_free_when_nothing_steers_new_tokens(tiny_model, saes, positions, threshold, hooks_during_decode):
    p = compile_policy(saes, threshold=threshold, steer=[{"kind": "add", "layer": 2, "feature": 7, "strength": 4.0, "positions": positions}])
    ids, attn = inputs(8)
    seen: list[int] = []
    probe = tiny_model.model.layers[3].register_forward_hook(lambda m, a, o: seen.append(hooks_on(tiny_model)))
    try:
        with steering(tiny_model, RunState([p] * B, torch.ones(B, P, dtype=torch.bool), attn)):
            tiny_model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=4, do_sample=False, pad_token_id=2)
    finally:
        probe.remove()
    assert seen[0] == 4  # prefill: counter, detect, steer, and the probe itself
    assert set(seen[1:]) == {hooks_during_decode}
    assert hooks_on(tiny_model) == 0


def _interrupting_batch_of_two_still_works(llm):
    assert hooks_on(llm.model) == 0, "an interrupted call left hooks on the model"
    rows = llm.batch(["first prompt", "a second prompt"], max_new_tokens=3)  # a leftover 1-row hook would refuse 2 rows
    assert len(rows) == 2 and all(r.report.fired == ("cyber",) for r in rows)


def test_ctrl_c_between_registering_and_the_block_leaves_no_hook(llm, monkeypatch):
    import safeguard.runtime.steering as engine

    real = engine.attach

    def attach_then_interrupt(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt  # lands after every hook is registered, before the with-block's try

    monkeypatch.setattr(engine, "attach", attach_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate("hello there", max_new_tokens=3)
    monkeypatch.undo()
    _interrupting_batch_of_two_still_works(llm)


def test_ctrl_c_inside_register_forward_hook_leaves_no_hook(llm, monkeypatch):
    layer = type(llm.model.model.layers[0])
    real = layer.register_forward_hook

    def register_then_interrupt(self, *a, **k):
        real(self, *a, **k)  # torch has added the hook; its handle never reaches the caller
        raise KeyboardInterrupt

    monkeypatch.setattr(layer, "register_forward_hook", register_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        llm.generate("hello there", max_new_tokens=3)
    monkeypatch.undo()
    _interrupting_batch_of_two_still_works(llm)


def test_a_model_without_decoder_layers_is_an_unsupported_model_error():
    from safeguard import ModelLoadError, UnsupportedModelError
    from safeguard.runtime.steering import decoder_layers

    with pytest.raises(UnsupportedModelError, match="cannot find the decoder layers of Linear") as info:
        decoder_layers(torch.nn.Linear(2, 2))
    assert isinstance(info.value, ModelLoadError) and isinstance(info.value, TypeError)  # old `except TypeError` still works


def test_a_forward_of_another_batch_size_is_a_steering_error(tiny_model, saes):
    from safeguard import SteeringError

    p = compile_policy(saes)
    ids, attn = inputs()
    run = RunState([p], torch.ones(1, P, dtype=torch.bool), attn[:1])  # set up for one row
    with pytest.raises(SteeringError, match="set up for 1 rows but layer 1 saw 3") as info, steering(tiny_model, run), torch.no_grad():
        tiny_model(input_ids=ids, attention_mask=attn)
    assert isinstance(info.value, RuntimeError)
    assert hooks_on(tiny_model) == 0
