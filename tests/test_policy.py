"""Policies (schema 2 and the explicit schema 1) and detector packs: loading, merging, validation that names the
file and field, hashing, and everything a hostile or careless file must not get through."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import yaml
from _tiny import policy_dict, policy_v2, write_tiny_pack

from safeguard import Policy, PolicyError
from safeguard.runtime.compile import resolve
from safeguard.runtime.pack import Pack

ROOT = Path(__file__).parents[1]


def write(tmp_path, data, name="p.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


# ------------------------------------------------------------------------------------------- schema 1
def test_version_1_files_keep_loading_as_explicit_policies(tmp_path):
    p = Policy.from_file(write(tmp_path, {**policy_dict(), "schema_version": 1}))
    assert p.schema_version == 2 and p.categories["cyber"].steer[0].kind == "add" and p.categories["cyber"].detect.threshold == -1.0
    r = resolve(p, None)
    assert [c.id for c in r.categories] == ["cyber"] and r.categories[0].sensitivity == "explicit"
    again = Policy.from_file(write(tmp_path, yaml.safe_load(p.to_yaml()), "again.yaml"))
    assert again.categories == p.categories
    changed = policy_dict()
    changed["categories"][0]["detect"]["threshold"] = 2.0
    assert Policy.from_dict(changed).content_hash != Policy.from_dict(policy_dict()).content_hash


def test_disabled_version_1_categories_are_off(llm):
    d = policy_dict()
    d["categories"][0]["enabled"] = False
    d["categories"].append({**policy_dict()["categories"][0], "id": "other", "detect": {"layer": 1, "features": [4], "threshold": 1e9}})
    r = llm.generate("hi", policy=Policy.from_dict(d), max_new_tokens=4)
    assert [x.category for x in r.report.decisions] == ["other"] and r.report.fired == ()


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda d: d.update(nmae="typo"), "nmae: unknown field"),
        (lambda d: d["categories"][0]["detect"].update(treshold=1), "categories.cyber.detect.treshold: unknown field"),
        (lambda d: d["categories"][0]["detect"].pop("threshold"), "categories.cyber.detect.threshold: field required"),
        (lambda d: d.update(mode="block"), "mode: Input should be 'enforce' or 'monitor'"),
        (lambda d: d["categories"][0]["steer"][0].update(kind="multiply"), "categories.cyber.steer[0]"),
        (lambda d: d["categories"][0]["steer"][0].update(positions="all"), "positions"),
        (lambda d: d["categories"][0].update(id="Bad Slug"), "taxonomy slugs"),
        (lambda d: d["categories"].append(copy.deepcopy(d["categories"][0])), "appears once"),
        (lambda d: d["categories"][0]["detect"].update(features=[1, 1]), "distinct"),
        (lambda d: d["categories"][0]["detect"].update(weights=[1.0]), "weights has 1 entries"),
        (lambda d: d.update(schema_version=3), "schema_version"),
    ],
)
def test_errors_name_the_file_and_field(tmp_path, mutate, expect):
    d = policy_dict()
    mutate(d)
    path = write(tmp_path, d)
    with pytest.raises(PolicyError) as info:
        Policy.from_file(path)
    assert expect in str(info.value) and str(path) in str(info.value)


def test_steering_before_detection_is_refused_when_compiled():
    d = policy_dict()
    d["categories"][0]["steer"][0].update(layer=0, positions="both")
    with pytest.raises(PolicyError, match="before detection"):
        resolve(Policy.from_dict(d), None)


def test_not_yaml_and_not_a_mapping(tmp_path):
    with pytest.raises(PolicyError, match=r"p.yaml: not valid YAML at line 1"):
        Policy.from_file(write(tmp_path, "name: [oops"))
    with pytest.raises(PolicyError, match="holds a mapping"):
        Policy.from_file(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.from_file(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------- schema 2
def test_extends_merges_category_by_category(tmp_path):
    write(tmp_path, {**policy_v2(cyber={"note": "root"}, fraud={}), "defaults": {"sensitivity": "relaxed", "message": "No."}}, "root.yaml")
    child = write(tmp_path, {"schema_version": 2, "name": "child", "version": "2", "extends": "root.yaml",
                             "defaults": {"message": "Not here."}, "categories": {"cyber": {"sensitivity": "strict"}, "fraud": {"response": "block"}}},
                  "child.yaml")
    p = Policy.from_file(child)
    assert p.name == "child" and p.extends == "root.yaml" and [Path(f).name for f, _ in p.chain] == ["child.yaml", "root.yaml"]
    assert p.categories["cyber"].note == "root" and p.sensitivity_of("cyber") == "strict"
    assert p.sensitivity_of("fraud") == "relaxed" and p.response_of("fraud") == "block" and p.message_of("fraud") == "Not here."
    r = resolve(p, Pack.load(write_tiny_pack(tmp_path / "pack")))
    assert r.category("cyber").threshold == -1.0 and r.category("fraud").response == "block" and r.category("fraud").message == "Not here."


def test_a_changed_parent_changes_the_childs_hash(tmp_path):
    root = write(tmp_path, policy_v2(), "root.yaml")
    child = write(tmp_path, {"schema_version": 2, "name": "c", "version": "1", "extends": "root.yaml", "categories": {}}, "child.yaml")
    h1 = Policy.from_file(child).content_hash
    root.write_text(root.read_text().replace("AIR-Bench", "AIR-Bench") + "description: changed\n")
    assert Policy.from_file(child).content_hash != h1


@pytest.mark.parametrize(
    ("child", "expect"),
    [
        ({"extends": "child.yaml"}, "cycle"),
        ({"extends": "../outside.yaml"}, "outside the file's folder"),
        ({"extends": "/etc/passwd"}, "relative to the file's folder"),
        ({"extends": "nosuchshipped"}, "no shipped policy is named 'nosuchshipped'"),
        ({"taxonomy": {"name": "AIR-Bench", "version": "2025"}}, "category ids are not comparable"),
        ({"categories": {"cyber": {"sensitivity": "strict", "max_false_positive_rate": 0.01}}}, "not both"),
        ({"categories": {"cyber": {"sensitivity": "paranoid"}}}, "categories.cyber.sensitivity"),
        ({"categories": {"cyber": {"respones": "block"}}}, "categories.cyber.respones: unknown field"),
        ({"categoires": {}}, "unknown field(s) ['categoires']"),
    ],
)
def test_child_errors_name_the_file(tmp_path, child, expect):
    write(tmp_path, policy_v2(), "root.yaml")
    path = write(tmp_path, {"schema_version": 2, "name": "child", "version": "1", "extends": "root.yaml", "categories": {}, **child}, "child.yaml")
    with pytest.raises(PolicyError) as info:
        Policy.from_file(path)
    assert expect in str(info.value) and "child.yaml" in str(info.value)


def test_sensitivity_levels_and_explicit_rates_come_from_the_pack(tmp_path):
    pack = Pack.load(write_tiny_pack(tmp_path / "pack"))
    r = resolve(Policy.from_dict(policy_v2(cyber={"sensitivity": "relaxed"}, fraud={"max_false_positive_rate": 0.03})), pack)
    assert r.category("cyber").threshold == 1e9 and (r.category("cyber").fpr, r.category("cyber").recall) == (0.0, 0.1)
    assert r.category("fraud").threshold == -1.0 and r.category("fraud").sensitivity == "max_fpr=0.03"  # the 0.02 point: never more permissive
    with pytest.raises(PolicyError, match="below every operating point"):
        resolve(Policy.from_dict(policy_v2(cyber={"max_false_positive_rate": 0.0}, fraud={})),
                Pack.load(write_tiny_pack(tmp_path / "p2")).model_copy(update={"categories": {
                    k: v.model_copy(update={"curve": v.curve[1:]}) for k, v in pack.categories.items()}}))
    with pytest.raises(PolicyError, match=r"pack 'tiny-pack' has no detector for it; it has \['cyber', 'fraud'\]"):
        resolve(Policy.from_dict(policy_v2(violence={})), pack)
    off = resolve(Policy.from_dict(policy_v2(cyber={"response": "off"}, fraud={})), pack)
    assert [c.id for c in off.categories] == ["fraud"]


def test_redirect_needs_the_packs_vectors(tmp_path):
    with_vectors = Pack.load(write_tiny_pack(tmp_path / "a"))
    r = resolve(Policy.from_dict(policy_v2(cyber={"response": "redirect"})), with_vectors)
    (action, folder), = r.category("cyber").steer
    assert action.kind == "vector" and action.key == "cyber" and folder == with_vectors.base_dir
    with pytest.raises(PolicyError, match="ships no redirect vectors"):
        resolve(Policy.from_dict(policy_v2(cyber={"response": "redirect"})), Pack.load(write_tiny_pack(tmp_path / "b", redirect=False)))


def test_shipped_policies_are_short_and_load_by_name():
    from safeguard.runtime.policy import shipped_policies

    assert {"default", "eu", "us"} <= set(shipped_policies())
    for name in ("default", "eu", "us"):
        text = (ROOT / "policies" / f"{name}.yaml").read_text()
        lines = [x for x in text.splitlines() if x.strip() and not x.lstrip().startswith("#")]
        assert len(lines) <= 40, f"{name}.yaml has {len(lines)} lines"
        assert Policy.load(name) is Policy.load(name)  # parsed once, then cached
    eu = Policy.load("eu")
    assert eu.extends == "default" and eu.sensitivity_of("privacy") == "strict" and eu.response_of("self_harm") == "block"
    assert Policy.load("us").response_of("operational_misuses") == "off"


def test_a_variant_replaces_only_the_defaults_it_names_and_is_validated():
    eu = Policy.load("eu")
    assert not any(eu.watches_reply(c) for c in eu.enforced)  # the shipped policies watch no replies (default 2.1.0)
    on = eu.with_defaults("eu-reply", watch_reply=True)
    assert on.name == "eu-reply" and all(on.watches_reply(c) for c in on.enforced)
    assert not any(eu.watches_reply(c) for c in eu.enforced)  # the policy itself is untouched
    assert on.enforced == eu.enforced and on.response_of("self_harm") == "block" and on.sensitivity_of("privacy") == "strict"
    assert on.model_dump(exclude={"name", "defaults"}) == eu.model_dump(exclude={"name", "defaults"})
    assert on.with_defaults("eu", watch_reply=False).model_dump() == eu.model_dump()
    with pytest.raises(PolicyError, match=r"defaults\.watch_reply"):
        eu.with_defaults("eu-bad", watch_reply="sometimes")


def test_one_eu_policy_loads_on_both_shipped_packs():
    from safeguard.runtime.pack import bundled_packs

    packs = {p.id: p for p in bundled_packs()}
    assert {"smollm2-135m-instruct", "llama-3-8b-it-res-jh"} <= set(packs)
    eu = Policy.load("eu")
    small, large = resolve(eu, packs["smollm2-135m-instruct"]), resolve(eu, packs["llama-3-8b-it-res-jh"])
    assert [c.id for c in small.categories] == [c.id for c in large.categories] == list(eu.categories)
    assert packs["smollm2-135m-instruct"].measured and not packs["llama-3-8b-it-res-jh"].measured
    assert {c.detect.layer for c in large.categories} == {25} and large.category("privacy").detect.features == [35831]
    assert small.category("privacy").sensitivity == "strict" and small.category("privacy").fpr is not None
    assert small.hash != large.hash


# ------------------------------------------------------------------------------------------ hardening
@pytest.mark.parametrize("bad", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("where", ["threshold", "weights", "strength"])
def test_non_finite_numbers_are_refused(tmp_path, bad, where):
    d = policy_dict()
    if where == "threshold":
        d["categories"][0]["detect"]["threshold"] = "BAD"
    elif where == "weights":
        d["categories"][0]["detect"].update(combine="sum", weights=[1.0, "BAD"])
    else:
        d["categories"][0]["steer"][0]["strength"] = "BAD"
    path = write(tmp_path, yaml.safe_dump(d).replace("BAD", bad).replace("'", ""))
    with pytest.raises(PolicyError, match="finite number"):
        Policy.from_file(path)


def test_non_finite_numbers_in_a_pack_are_refused(tmp_path):
    path = write_tiny_pack(tmp_path)
    path.write_text(path.read_text().replace("threshold: -1.0", "threshold: -.inf", 1))
    with pytest.raises(PolicyError, match="finite number"):
        Pack.load(path)


def test_yaml_anchor_bombs_are_refused_at_once(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = yaml.safe_dump(policy_dict()) + "provenance:\n" + "\n".join("  " + x for x in lines) + "\n"
    path = write(tmp_path, bomb)
    t0 = time.perf_counter()
    with pytest.raises(PolicyError, match="anchors and aliases are not allowed"):
        Policy.from_file(path)
    assert time.perf_counter() - t0 < 1.0
    big = write(tmp_path, "description: '" + "x" * 300_000 + "'\n", "big.yaml")
    with pytest.raises(PolicyError, match="more than a policy may hold"):
        Policy.from_file(big)


def test_referenced_files_stay_in_the_policys_folder(tmp_path):
    for outside in ("/etc/passwd", "../v.safetensors", "sub/../../v.safetensors"):
        d = policy_dict(steer=[{"kind": "vector", "layer": 2, "file": outside, "key": "k", "strength": 1.0}])
        with pytest.raises(PolicyError, match="relative to the file's folder|outside the file's folder"):
            Policy.from_file(write(tmp_path, d))
    pack = write_tiny_pack(tmp_path / "pack")
    pack.write_text(pack.read_text().replace("file: pack.vectors.safetensors", "file: ../../model.safetensors"))
    with pytest.raises(PolicyError, match="outside the file's folder"):
        Pack.load(pack)


def test_directories_binary_files_and_secrets(tmp_path):
    with pytest.raises(PolicyError, match="is a directory"):
        Policy.from_file(tmp_path)
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"name: \xff\xfe\x00 oops")
    with pytest.raises(PolicyError, match="not UTF-8"):
        Policy.from_file(binary)
    secret = write(tmp_path, "root:$6$SECRETHASH:19000:0:99999:7:::\nalice:$6$OTHERSECRET:19000:0:99999:7:::\n", "shadow")
    with pytest.raises(PolicyError) as info:
        Policy.load(secret)
    assert "SECRETHASH" not in str(info.value) and "OTHERSECRET" not in str(info.value)
    with pytest.raises(PolicyError, match="not int"):
        Policy.load(123)


def test_a_policy_file_is_parsed_once_and_reread_when_it_changes(tmp_path, monkeypatch):
    from safeguard.runtime import _files

    path = write(tmp_path, policy_dict())
    calls = []
    real = _files.read_yaml
    monkeypatch.setattr("safeguard.runtime.policy.read_yaml", lambda *a, **k: calls.append(a) or real(*a, **k))
    first = Policy.load(path)
    assert Policy.load(path) is first and Policy.load(str(path)) is first and len(calls) == 1
    d = policy_dict()
    d["categories"][0]["detect"]["threshold"] = 3.5
    time.sleep(0.01)
    write(tmp_path, d)
    assert Policy.load(path).categories["cyber"].detect.threshold == 3.5 and len(calls) == 2


def test_compiled_hash_covers_pack_vectors_and_sae_weights(tokenizer, tiny_model, tmp_path):
    import torch
    from _tiny import make_sae
    from safetensors.torch import save_file

    from safeguard import SteeredLLM
    from safeguard.runtime.models import LoadedModel
    from safeguard.runtime.saes import SAESet

    loaded = LoadedModel(model=tiny_model, tokenizer=tokenizer, name="tiny-llama", source="test", quantization=None)
    pol = Policy.from_dict(policy_v2(cyber={"response": "redirect"}, fraud={}))

    def compiled_hash(pack, scale=1.0):
        first = make_sae(1, seed=1)
        with torch.no_grad():
            first.sae.W_enc.mul_(scale)
        return SteeredLLM(loaded, SAESet([first, make_sae(2, seed=2)]), pol, pack=pack).compile_policy(pol).hash

    h1 = compiled_hash(write_tiny_pack(tmp_path / "a"))
    assert compiled_hash(write_tiny_pack(tmp_path / "b")) == h1  # the same bytes in another folder, the same weights
    c = write_tiny_pack(tmp_path / "c")
    save_file({"cyber": torch.zeros(32), "fraud": torch.zeros(32)}, str(c.parent / "pack.vectors.safetensors"))
    assert compiled_hash(c) != h1  # the redirect vectors changed
    assert compiled_hash(write_tiny_pack(tmp_path / "d"), scale=10.0) != h1  # same release name, encoder x 10
