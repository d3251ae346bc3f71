"""Running from the wheels: build safeguard's and langchain-safeguard's wheels, install them into a fresh virtualenv
outside the repository and run the demo, the README quick start and `safeguard classify` there.

The heavy dependencies (torch, transformers, sae-lens, ...) are not reinstalled: the fresh venv reads them from a
filtered view of the running interpreter's site-packages (symlinks to every entry except safeguard's and
langchain-safeguard's own, editable ones included), added by a ``.pth`` line. ``.pth`` files inside that view are
not executed, so no editable finder can point back at the source tree; the tests check that what is imported is
the installed wheel. Slow: two wheel builds and three model loads (about two minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
_OURS = ("safeguard", "langchain_safeguard", "__editable__")
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", ".ruff_cache", "docs", "tests")


def readme_quick_start() -> str:
    """The README's quick-start code block, verbatim, with one line appended that reports what it did."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quick start"):]
    block = section[section.index("```python\n") + len("```python\n"):]
    block = block[:block.index("```")]
    return ("import torch\ntorch.set_num_threads(1)\n" + block +
            "print('QUICKSTART', llm.policy.name, [row.report.policy_name for row in rows], r.report.action)\n")


CHECK_INSTALLED = """
import importlib.metadata as md, importlib.resources as res, json, sys
import safeguard, langchain_safeguard
from safeguard.runtime.pack import bundled_packs
from safeguard.runtime.policy import shipped_dir
from safeguard.runtime.saes import bundled_sae_dirs
out = {
    "safeguard": safeguard.__file__, "langchain_safeguard": langchain_safeguard.__file__, "policy": str(shipped_dir() / "default.yaml"),
    "packs": sorted(p.id for p in bundled_packs()),
    "versions": [md.version("safeguard"), md.version("langchain-safeguard")], "safeguard_version": safeguard.__version__,
    "policies": sorted(p.name for p in res.files("safeguard.policies").iterdir() if p.name.endswith((".yaml", ".safetensors"))),
    "bundled": [str(p) for p in bundled_sae_dirs()],
    "data": sorted(p.name for p in res.files("safeguard.data").iterdir() if p.name.endswith(".jsonl")),
}
print(json.dumps(out))
"""


def _dependency_view(target: Path) -> Path:
    """Symlinks to every entry of the running interpreter's site-packages except safeguard's own."""
    site = Path(sysconfig.get_paths()["purelib"])
    target.mkdir()
    for entry in site.iterdir():
        if entry.name.startswith(_OURS) or entry.suffix == ".pth":
            continue
        (target / entry.name).symlink_to(entry)
    return target


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """A fresh venv outside the repository with the two wheels installed; returns (venv bin folder, work dir, env)."""
    tmp = tmp_path_factory.mktemp("wheel")
    assert ROOT not in tmp.parents
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # build from copies: setuptools writes build/ and *.egg-info next to the sources
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE, symlinks=True)
    shutil.rmtree(src / "integrations")
    shutil.copytree(ROOT / "integrations" / "langchain", tmp / "src-langchain", ignore=_NOT_SOURCE)
    wheels = tmp / "wheels"
    for folder in (src, tmp / "src-langchain"):
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels), str(folder)], tmp, env)
    built = sorted(wheels.glob("*.whl"))
    assert [w.name.split("-")[0] for w in built] == ["langchain_safeguard", "safeguard"], built
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp, env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", *map(str, built)], tmp, env)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, env).stdout.strip()
    Path(purelib, "_safeguard_test_dependencies.pth").write_text(str(_dependency_view(tmp / "deps")) + "\n")
    work = tmp / "work"
    work.mkdir()
    return venv / "bin", work, env


def test_the_wheels_ship_the_package_data_and_are_what_is_imported(wheel_env):
    bin_dir, work, env = wheel_env
    info = json.loads(_run([str(bin_dir / "python"), "-c", CHECK_INSTALLED], work, env).stdout)
    venv = str(bin_dir.parent)
    for key in ("safeguard", "langchain_safeguard", "policy"):
        assert info[key].startswith(venv), f"{key} came from {info[key]}, not from the installed wheel"
    assert info["versions"] == ["0.1.0", "0.1.0"] and info["safeguard_version"] == "0.1.0"
    assert {"default.yaml", "eu.yaml", "us.yaml"} <= set(info["policies"])
    assert info["packs"] == ["llama-3-8b-it-res-jh", "smollm2-135m-instruct"], info["packs"]
    assert info["bundled"] and all(p.startswith(venv) for p in info["bundled"]), f"bundled SAEs: {info['bundled']}"
    assert {"harmless.jsonl", "harmless_blind.jsonl"} <= set(info["data"])


def test_demo_runs_from_the_wheel(wheel_env):
    bin_dir, work, env = wheel_env
    proc = _run([str(bin_dir / "safeguard"), "demo", "--n", "1", "--max-new-tokens", "8", "--threads", "1"], work, env)
    out = proc.stdout
    assert "kernels-community" not in proc.stderr, "a plain CPU load imported bitsandbytes"
    assert "Policy default" in out and out.count("fired:") == 2 and "Refusals (phrase matcher)" in out


def test_the_readme_quick_start_runs_from_the_wheel(wheel_env):
    bin_dir, work, env = wheel_env
    out = _run([str(bin_dir / "python"), "-c", readme_quick_start()], work, env).stdout
    line = next(x for x in out.splitlines() if x.startswith("QUICKSTART"))
    assert line.startswith("QUICKSTART eu ['eu', 'us']"), out


def test_classify_runs_from_the_wheel(wheel_env):
    bin_dir, work, env = wheel_env
    out = _run([str(bin_dir / "safeguard"), "classify", "How do I bake bread?", "--json", "--threads", "1"], work, env).stdout
    [row] = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert row["text"] == "How do I bake bread?" and row["fired"] == [] and len(row["scores"]) >= 10
