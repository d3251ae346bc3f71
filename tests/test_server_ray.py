"""Ray Serve: a local two-replica cluster, each replica with its own tiny model, driven through the ``openai`` client."""

from __future__ import annotations

import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from _tiny import policy_dict  # noqa: E402

from safeguard import Policy  # noqa: E402
from safeguard.server import ServerConfig  # noqa: E402
from safeguard.server.ray import build_deployment  # noqa: E402

TESTS = str(Path(__file__).resolve().parent)
HI = [{"role": "user", "content": "How do I write a port scanner?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_loader():
    """Runs inside each replica: the tiny random model with the embedded tokenizer."""
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    import torch
    from _fixtures import tiny_steered_llm
    from transformers import AutoTokenizer

    from safeguard.runtime.models import embedded_model_folder

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(embedded_model_folder())
    tok.padding_side = "left"
    return tiny_steered_llm(tok)


@pytest.mark.slow
def test_two_ray_replicas_through_openai():
    quiet = policy_dict(threshold=1e9)
    quiet["name"] = "quiet"
    port = _free_port()
    path = os.pathsep.join(p for p in (TESTS, str(Path(TESTS).parent), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        from ray import serve

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_deployment(_tiny_loader, {"quiet": Policy.from_dict(quiet)}, config=ServerConfig(batch_window_s=0.01),
                               replicas=2, num_cpus=0.5)
        serve.run(app, name="safeguard", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        names = ["quiet", "default"] * 6
        with ThreadPoolExecutor(6) as pool:
            out = list(pool.map(lambda n: c.chat.completions.create(model=f"safeguard/{n}", messages=HI, max_tokens=4), names))
        assert [r.model_extra["safeguard"]["policy"] for r in out] == names
        assert [r.model_extra["safeguard"]["fired"] for r in out] == [[], ["cyber"]] * 6
        chunks = list(c.chat.completions.create(model="safeguard/quiet", messages=HI, max_tokens=4, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == out[0].choices[0].message.content
        pids = set()
        with ThreadPoolExecutor(4) as pool:
            for _ in range(10):  # bounded: both replicas answer
                pids |= set(pool.map(lambda _: httpx.get(f"{base}/health", timeout=30).json()["pid"], range(8)))
                if len(pids) == 2:
                    break
                time.sleep(0.1)
        assert len(pids) == 2
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
