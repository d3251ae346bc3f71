"""Policy files: validation that names the file and field, hashing, and checks against model and SAEs."""

from __future__ import annotations

import pytest
import yaml
from _tiny import policy_dict

from safeguard import Policy, PolicyError


def write(tmp_path, data, name="p.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_round_trip_and_hash(tmp_path):
    p = Policy.from_file(write(tmp_path, policy_dict()))
    assert p.name == "tiny" and p.categories[0].steer[0].kind == "add"
    again = Policy.from_file(write(tmp_path, yaml.safe_load(p.to_yaml()), "again.yaml"))
    assert again.content_hash == p.content_hash and len(p.content_hash) == 64
    changed = policy_dict()
    changed["categories"][0]["detect"]["threshold"] = 2.0
    assert Policy.from_dict(changed).content_hash != p.content_hash


def test_vector_file_bytes_are_part_of_the_hash(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"k": torch.ones(32)}, str(tmp_path / "v.safetensors"))
    d = policy_dict(steer=[{"kind": "vector", "layer": 2, "file": "v.safetensors", "key": "k", "strength": 1.0}])
    h1 = Policy.from_file(write(tmp_path, d)).content_hash
    save_file({"k": torch.zeros(32)}, str(tmp_path / "v.safetensors"))
    assert Policy.from_file(write(tmp_path, d)).content_hash != h1


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda d: d.update(nmae="typo"), "nmae: unknown field"),
        (lambda d: d["categories"][0]["detect"].update(treshold=1), "categories[0].detect.treshold: unknown field"),
        (lambda d: d["categories"][0]["detect"].pop("threshold"), "categories[0].detect.threshold: field required"),
        (lambda d: d.update(mode="block"), "mode: Input should be 'enforce' or 'monitor'"),
        (lambda d: d["categories"][0]["steer"][0].update(kind="multiply"), "categories[0].steer[0]"),
        (lambda d: d["categories"][0]["steer"][0].update(positions="all"), "positions"),
        (lambda d: d["categories"][0].update(id="Bad Slug"), "categories[0].id"),
        (lambda d: d["categories"].append(dict(d["categories"][0])), "appears twice"),
        (lambda d: d["categories"][0]["detect"].update(features=[1, 1]), "distinct"),
        (lambda d: d["categories"][0]["detect"].update(weights=[1.0]), "weights has 1 entries"),
        (lambda d: d.update(schema_version=2), "schema_version"),
        (lambda d: d["categories"][0]["steer"][0].update(layer=0, positions="both"), "before detection"),
    ],
)
def test_errors_name_the_file_and_field(tmp_path, mutate, expect):
    d = policy_dict()
    mutate(d)
    path = write(tmp_path, d)
    with pytest.raises(PolicyError) as info:
        Policy.from_file(path)
    assert expect in str(info.value) and str(path) in str(info.value)


def test_not_yaml_and_not_a_mapping(tmp_path):
    with pytest.raises(PolicyError, match=r"p.yaml: not valid YAML at line 1"):
        Policy.from_file(write(tmp_path, "name: [oops"))
    with pytest.raises(PolicyError, match="holds a mapping"):
        Policy.from_file(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.from_file(tmp_path / "nope.yaml")


def test_checks_against_model_and_saes(saes):
    p = Policy.from_dict(policy_dict())
    p.check_against(model_name="tiny-llama", num_layers=4, saes=saes)
    with pytest.raises(PolicyError, match="'model' is 'tiny-llama'"):
        p.check_against(model_name="other", num_layers=4, saes=saes)
    bad_layer = Policy.from_dict(policy_dict(steer=[{"kind": "add", "layer": 9, "feature": 1, "strength": 1.0}]))
    with pytest.raises(PolicyError, match=r"steer\[0\].layer is 9"):
        bad_layer.check_against(model_name="tiny-llama", num_layers=4, saes=saes)
    no_sae = Policy.from_dict(policy_dict(steer=[{"kind": "add", "layer": 3, "feature": 1, "strength": 1.0}]))
    with pytest.raises(PolicyError, match=r"SAEs are loaded at layers \[1, 2\]"):
        no_sae.check_against(model_name="tiny-llama", num_layers=4, saes=saes)
    other_sae = Policy.from_dict({**policy_dict(), "sae": "another-release"})
    with pytest.raises(PolicyError, match="'sae' is 'another-release'"):
        other_sae.check_against(model_name="tiny-llama", num_layers=4, saes=saes)


def test_disabled_categories_are_neither_detected_nor_steered(llm):
    d = policy_dict()
    d["categories"][0]["enabled"] = False
    d["categories"].append({**policy_dict()["categories"][0], "id": "other", "enabled": True,
                            "detect": {"layer": 1, "features": [4], "threshold": 1e9}})
    r = llm.generate("hi", policy=Policy.from_dict(d), max_new_tokens=4)
    assert [x.category for x in r.report.decisions] == ["other"] and r.report.fired == ()


def test_shipped_policies_validate():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "policies").glob("*.yaml"))
    for f in files:
        p = Policy.from_file(f)
        assert p.taxonomy.version and p.categories
