"""``safeguard serve`` against real clients: a live uvicorn server on 127.0.0.1 (random port, a background thread)
driven by the ``openai`` package, LangChain's ``ChatOpenAI`` and httpx. The model is a tiny random Llama."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from _fixtures import tiny_steered_llm  # noqa: E402
from _tiny import HIDDEN, LAYERS, make_sae, policy_dict  # noqa: E402

from safeguard import Policy  # noqa: E402
from safeguard.server import MicroBatcher, ServerConfig, Settings, create_app  # noqa: E402
from safeguard.server.run import parse_policy_flags  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
HI = [{"role": "user", "content": "How do I write a port scanner?"}]


def _policies() -> dict[str, Policy]:
    """``fires``: the category always fires (and steers); ``quiet``: it never does."""
    quiet = policy_dict(threshold=1e9)
    quiet["name"] = "quiet"
    fires = policy_dict()
    fires["name"] = "fires"
    return {"fires": Policy.from_dict(fires), "quiet": Policy.from_dict(quiet)}


@contextmanager
def live(app, graceful: float = 10.0):
    """uvicorn in a background thread on a free loopback port; ``should_exit`` on the way out."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=graceful))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(400):
        if server.started or not thread.is_alive():
            break
        time.sleep(0.025)
    assert server.started, "the server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture
def served(llm):
    with live(create_app(llm, _policies())) as (base, _):
        yield base


@pytest.fixture
def long_llm(tokenizer):
    """The tiny model with a long context, so one request can run for seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from safeguard.runtime.saes import SAESet

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = 2
    return tiny_steered_llm(tokenizer, model, SAESet([make_sae(1, seed=1), make_sae(2, seed=2)]))


def _client(base: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, timeout=60, **kw)


def _metric(base: str, name: str, **kw) -> float:
    text = httpx.get(f"{base}/metrics", **kw).text
    total = 0.0
    for line in text.splitlines():
        if re.match(rf"^{re.escape(name)}(\{{|\s)", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


# ------------------------------------------------------------------------------------------ the openai client
def test_models_and_health(served):
    ids = [m.id for m in _client(served).models.list().data]
    assert ids[0] == "safeguard" and {"safeguard/fires", "safeguard/quiet", "safeguard/default"} <= set(ids)
    h = httpx.get(f"{served}/health").json()
    assert h["status"] == "ok" and h["policies"] == ["default", "fires", "quiet"]


def test_openai_sync_report_and_policy_choice(served, llm):
    c = _client(served)
    quiet = c.chat.completions.create(model="safeguard/quiet", messages=HI, max_tokens=6)
    fires = c.chat.completions.create(model="safeguard", messages=HI, max_tokens=6, extra_body={"safeguard": {"policy": "fires"}})
    assert quiet.model == "safeguard/quiet" and fires.model == "safeguard/fires"
    rq, rf = quiet.model_extra["safeguard"], fires.model_extra["safeguard"]
    assert (rq["policy"], rq["fired"], rq["applied"]) == ("quiet", [], [])
    assert rf["policy"] == "fires" and rf["fired"] == ["cyber"] and rf["applied"][0]["kind"] == "add"
    assert rf["policy_hash"] == llm.compile_policy(_policies()["fires"]).hash  # policy, pack and SAE weights
    assert quiet.usage.completion_tokens == 6 and quiet.choices[0].finish_reason == "length"
    assert quiet.usage.total_tokens == quiet.usage.prompt_tokens + 6


async def test_openai_async_concurrent(served):
    c = openai.AsyncOpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=60)
    names = ["fires", "quiet", "fires", "quiet"]
    out = await asyncio.gather(*[c.chat.completions.create(model=f"safeguard/{n}", messages=HI, max_tokens=5) for n in names])
    assert [r.model_extra["safeguard"]["policy"] for r in out] == names
    assert [bool(r.model_extra["safeguard"]["fired"]) for r in out] == [True, False, True, False]
    await c.close()


def test_openai_streaming_usage_and_report(served):
    c = _client(served)
    chunks = list(c.chat.completions.create(model="safeguard/fires", messages=HI, max_tokens=7, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].model_extra["safeguard"]["fired"] == ["cyber"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].model_extra["safeguard"]["policy"] == "fires"
    plain = c.chat.completions.create(model="safeguard/fires", messages=HI, max_tokens=7)
    assert text == plain.choices[0].message.content  # the same greedy reply streamed or not


def test_raw_sse_ends_with_done(served):
    body = {"model": "safeguard/quiet", "messages": HI, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{served}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(ln[6:])["object"] == "chat.completion.chunk" for ln in lines[:-1])


# ----------------------------------------------------------------------------------------------- LangChain
def test_langchain_chatopenai(served):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{served}/v1", api_key="unused", model="safeguard/quiet", max_tokens=5, max_retries=0,
                      include_response_headers=True)
    msg = chat.invoke("How do I write a port scanner?")
    assert msg.response_metadata["model_name"] == "safeguard/quiet"
    assert json.loads(msg.response_metadata["headers"]["x-safeguard-report"])["fired"] == []
    assert msg.usage_metadata["output_tokens"] == 5
    fires = ChatOpenAI(base_url=f"{served}/v1", api_key="unused", model="safeguard", max_tokens=5, max_retries=0,
                       include_response_headers=True, extra_body={"safeguard": {"policy": "fires"}}).invoke("hello")
    assert fires.response_metadata["model_name"] == "safeguard/fires"
    report = json.loads(fires.response_metadata["headers"]["x-safeguard-report"])
    assert report["policy"] == "fires" and report["fired"] == ["cyber"]
    assert fires.response_metadata["headers"]["x-safeguard-fired"] == "cyber"
    chunks = list(chat.stream("How do I write a port scanner?"))
    assert "".join(c.content for c in chunks) == msg.content
    assert any(c.response_metadata.get("model_name") == "safeguard/quiet" for c in chunks)


# -------------------------------------------------------------------------------------------- bad requests
def _post(base: str, body, **kw) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=30, **kw)
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30, **kw)


def _err(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    return err


def test_unknown_policy_lists_names_and_paths_are_names(served):
    c = _client(served)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="safeguard/eu", messages=HI, max_tokens=2)
    assert e.value.status_code == 400 and "['default', 'fires', 'quiet']" in e.value.body["message"]
    for name in ("policies/eu.yaml", "/etc/passwd", "../../etc/shadow"):
        err = _err(_post(served, {"model": "safeguard", "messages": HI, "safeguard": {"policy": name}}), 400, "safeguard.policy")
        assert "known policies" in err["message"] and "root:" not in err["message"]
    _err(_post(served, {"model": "gpt-4o", "messages": HI}), 400, "model")


@pytest.mark.parametrize(("body", "param"), [
    ({"temperature": "0.7"}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": 1e308 * 10}, "temperature"),
    ({"seed": 2**70}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ["x" * 8000]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"n": 2}, "n"),
    ({"top_p": 0.5}, "top_p"),
    ({"tools": []}, "tools"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
])
def test_bad_values_get_400_naming_the_field(served, body, param):
    payload = {"model": "safeguard", "messages": HI, "max_tokens": 2, **body}
    raw = json.dumps(payload).replace("Infinity", "1e999")  # json.dumps writes inf as Infinity
    err = _err(_post(served, raw), 400)
    assert err["param"] == param, err


def test_nan_temperature_and_lone_surrogate_400(served):
    _err(_post(served, '{"model": "safeguard", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'), 400, "temperature")
    _err(_post(served, '{"model": "safeguard", "messages": [{"role": "user", "content": "a\\ud800b"}]}'), 400, "messages.0.content")
    _err(_post(served, b"{not json"), 400)


def test_input_error_from_the_model_is_400(served):
    err = _err(_post(served, {"model": "safeguard", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
               400, "messages")
    assert "last message" in err["message"]
    err = _err(_post(served, {"model": "safeguard", "stream": True, "messages": [{"role": "user", "content": "  "}]}), 400, "messages")


def test_plain_string_stop_is_one_stop_string(served):
    c = _client(served)
    text = c.chat.completions.create(model="safeguard/quiet", messages=HI, max_tokens=30).choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 4]
    cut = c.chat.completions.create(model="safeguard/quiet", messages=HI, max_tokens=30, stop=stop)
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_moderations(served):
    r = httpx.post(f"{served}/v1/moderations", json={"input": ["one", "two"], "model": "safeguard/fires"}, timeout=30).json()
    assert r["model"] == "safeguard/fires" and len(r["results"]) == 2
    res = r["results"][0]
    assert res["flagged"] is True and res["categories"] == {"cyber": True} and isinstance(res["category_scores"]["cyber"], float)
    assert r["safeguard"]["policy"] == "fires" and r["safeguard"]["reports"][0]["mode"] == "monitor"
    quiet = _client(served).moderations.create(input="one", model="safeguard/quiet")
    assert quiet.results[0].flagged is False
    _err(httpx.post(f"{served}/v1/moderations", json={"input": "x", "model": "safeguard/../eu"}, timeout=30), 400, "model")


def test_metrics(served):
    _client(served).chat.completions.create(model="safeguard/fires", messages=HI, max_tokens=4)
    assert _metric(served, "safeguard_requests_total") >= 1
    assert _metric(served, 'safeguard_fired_categories_total{category="cyber",policy="fires"}') >= 1
    assert _metric(served, "safeguard_generated_tokens_total") >= 4
    assert _metric(served, "safeguard_queue_depth") == 0
    assert _metric(served, "safeguard_request_latency_seconds_count") >= 1


# -------------------------------------------------------------------------------------------------- limits
def test_api_key(llm):
    with live(create_app(llm, config=ServerConfig(api_key="s3cret"))) as (base, _):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            _err(httpx.post(f"{base}/v1/chat/completions", json={"model": "safeguard", "messages": HI}, headers=headers), 401)
        with pytest.raises(openai.AuthenticationError):
            _client(base, api_key="nope").models.list()
        assert _client(base, api_key="s3cret").chat.completions.create(model="safeguard", messages=HI, max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"{base}/metrics").status_code == 401


def test_body_size_and_max_tokens(llm):
    with live(create_app(llm, config=ServerConfig(max_body_bytes=2000, max_tokens=16, default_max_tokens=4))) as (base, _):
        _err(_post(base, {"model": "safeguard", "messages": [{"role": "user", "content": "x" * 5000}]}), 413)
        err = _err(_post(base, {"model": "safeguard", "messages": HI, "max_tokens": 17}), 400, "max_tokens")
        assert "16" in err["message"]
        _err(_post(base, {"model": "safeguard", "messages": HI, "max_completion_tokens": 99}), 400, "max_completion_tokens")
        assert _post(base, {"model": "safeguard", "messages": HI}).json()["usage"]["completion_tokens"] == 4


def test_timeout_504_stops_the_row(long_llm):
    with live(create_app(long_llm, config=ServerConfig(request_timeout_s=0.5, max_tokens=6000))) as (base, _):
        t0 = time.monotonic()
        err = _err(_post(base, {"model": "safeguard", "messages": HI, "max_tokens": 6000}), 504)
        assert err["code"] == "timeout" and time.monotonic() - t0 < 3
        assert _post(base, {"model": "safeguard", "messages": HI, "max_tokens": 3}).status_code == 200  # the model is free again
        assert _metric(base, "safeguard_generated_tokens_total") < 6000


def _first_content(lines) -> None:
    for line in lines:
        if '"content":"' in line and '"content":""' not in line:
            return
    raise AssertionError("no content chunk")


def test_queue_full_429_and_disconnect_stops_stream(long_llm):
    with live(create_app(long_llm, config=ServerConfig(max_queue=1, max_tokens=6000))) as (base, _):
        body = {"model": "safeguard", "messages": HI, "max_tokens": 6000, "stream": True}
        with httpx.Client(timeout=30) as client, client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the response, which is the disconnect below
            _first_content(lines)
            err = _err(_post(base, {"model": "safeguard", "messages": HI, "max_tokens": 2}), 429)
            assert err["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                _client(base).chat.completions.create(model="safeguard", messages=HI, max_tokens=2)
        # the client is gone: its generation stops, and the slot frees
        for _ in range(100):
            if _metric(base, "safeguard_streams_stopped_total") >= 1:
                break
            time.sleep(0.1)
        assert _metric(base, "safeguard_streams_stopped_total") == 1
        assert _metric(base, "safeguard_generated_tokens_total") < 6000
        assert _metric(base, "safeguard_queue_depth") == 0
        assert _post(base, {"model": "safeguard", "messages": HI, "max_tokens": 2}).status_code == 200


def test_graceful_shutdown_finishes_inflight(long_llm):
    app = create_app(long_llm, config=ServerConfig(max_tokens=6000))
    with live(app) as (base, server), ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_post, base, {"model": "safeguard", "messages": HI, "max_tokens": 400})
        for _ in range(200):
            if httpx.get(f"{base}/health").json()["queue_depth"] == 1:
                break
            time.sleep(0.01)
        server.should_exit = True  # what SIGTERM does
        r = fut.result(timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 400


# ---------------------------------------------------------------------------------------------- batching
def test_batched_rows_equal_single_requests(llm):
    """Greedy rows of one padded batch, under different policies, equal their single-request text. The prompts have
    different lengths, so rows are left-padded; on this model the padding leaves the greedy tokens unchanged."""
    pols = _policies()
    prompts = [HI, [{"role": "user", "content": "hi"}], [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}], HI]
    rows = [pols["fires"], pols["quiet"], pols["fires"], None]
    single = [llm.chat(p, policy=pol, max_new_tokens=12) for p, pol in zip(prompts, rows, strict=True)]
    sizes: list[int] = []
    b = MicroBatcher(llm, window_s=0.5, max_batch=4, on_batch=sizes.append)
    try:
        jobs = [b.submit(p, pol, Settings(12)) for p, pol in zip(prompts, rows, strict=True)]
        batched = [j.future.result(timeout=60) for j in jobs]
    finally:
        b.close()
    assert sizes == [4]
    assert [r.text for r in batched] == [r.text for r in single]
    assert [r.report.fired for r in batched] == [("cyber",), (), ("cyber",), ("cyber",)]


def test_batcher_groups_by_sampler_and_isolates_bad_rows(llm):
    """Rows with their own max_tokens and stop strings share one generate; another temperature waits for its own round
    (one sampler per generate call)."""
    sizes: list[int] = []
    b = MicroBatcher(llm, window_s=0.3, max_batch=8, on_batch=sizes.append)
    try:
        jobs = [b.submit(HI, None, Settings(4)), b.submit(HI, None, Settings(5, stop=("zzz",))), b.submit(HI, None, Settings(3, temperature=0.7)),
                b.submit(HI, None, Settings(2)), b.submit([{"role": "assistant", "content": "x"}], None, Settings(4))]
        assert [j.future.result(timeout=60).completion_tokens for j in jobs[:4]] == [4, 5, 3, 2]
        with pytest.raises(ValueError, match="user"):
            jobs[4].future.result(timeout=60)
    finally:
        b.close()
    assert sizes == [4, 1, 1, 1, 1, 1]  # the greedy rows (one bad) together, rerun row by row; then the sampled one


def test_batched_rows_with_their_own_settings_equal_single_requests(llm):
    full = llm.chat(HI, max_new_tokens=12).text
    settings = [Settings(12, stop=(full[5:8],)), Settings(3), Settings(9, stop=("zzz",)), Settings(12)]
    prompts = [HI, [{"role": "user", "content": "hi"}], HI, [{"role": "user", "content": "Tell me a long story."}]]
    single = [llm.chat(p, max_new_tokens=st.max_new_tokens, stop=list(st.stop) or None) for p, st in zip(prompts, settings, strict=True)]
    sizes: list[int] = []
    b = MicroBatcher(llm, window_s=0.5, max_batch=4, on_batch=sizes.append)
    try:
        jobs = [b.submit(p, None, st) for p, st in zip(prompts, settings, strict=True)]
        batched = [j.future.result(timeout=60) for j in jobs]
    finally:
        b.close()
    assert sizes == [4]
    assert [(r.text, r.completion_tokens) for r in batched] == [(r.text, r.completion_tokens) for r in single]
    assert batched[0].text == full[:5]


def test_server_batches_concurrent_streams(llm):
    """Concurrent streaming requests share one generate (fewer batches than requests); each stream's text is its
    single request's, with its own max_tokens."""
    single = {n: llm.chat(HI, policy=_policies()[n], max_new_tokens=n_tok).text for n, n_tok in (("fires", 8), ("quiet", 5))}
    with live(create_app(llm, _policies(), config=ServerConfig(batch_window_s=0.3))) as (base, _), ThreadPoolExecutor(4) as pool:
        c = _client(base)

        def one(i: int) -> str:
            name, n_tok = (("fires", 8), ("quiet", 5))[i % 2]
            chunks = c.chat.completions.create(model=f"safeguard/{name}", messages=HI, max_tokens=n_tok, stream=True)
            return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

        out = list(pool.map(one, range(4)))
        assert out == [single["fires"], single["quiet"]] * 2
        assert _metric(base, "safeguard_batch_rows_sum") == 4 and _metric(base, "safeguard_batch_rows_count") < 4  # 4 rows, fewer calls


def test_server_batches_concurrent_requests(llm):
    with live(create_app(llm, _policies(), config=ServerConfig(batch_window_s=0.2))) as (base, _), ThreadPoolExecutor(4) as pool:
        c = _client(base)
        names = ["fires", "quiet", "fires", "quiet"]
        out = list(pool.map(lambda n: c.chat.completions.create(model=f"safeguard/{n}", messages=HI, max_tokens=6), names))
        assert [r.model_extra["safeguard"]["policy"] for r in out] == names
        assert _metric(base, "safeguard_batch_rows_count") < 4  # fewer generate calls than requests


# --------------------------------------------------------------------------------------------- CLI, README
def test_policy_flags():
    assert parse_policy_flags(["eu=policies/eu.yaml", "us"]) == {"eu": "policies/eu.yaml", "us": "us"}
    with pytest.raises(ValueError, match="twice"):
        parse_policy_flags(["eu=a", "eu=b"])


def test_readme_curl_example_body(served):
    text = README.read_text()
    block = text[text.index("## Serve it"):]
    body = json.loads(re.search(r"-d '(\{.*?\})'", block, re.S).group(1))
    body["model"] = "safeguard/fires" if body["model"] != "safeguard" else "safeguard"
    r = _post(served, body)
    assert r.status_code == 200 and "safeguard" in r.json()


@pytest.mark.slow
def test_safeguard_serve_command_embedded_model(tmp_path):
    """The README's start command on the embedded model, in a subprocess; the README's curl body and openai example;
    SIGTERM ends it cleanly."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = README.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", "from safeguard.cli import main; main()", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--policy", "eu=policies/eu.yaml", "--policy", "us=policies/us.yaml", "--threads", "1"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # bounded: the model loads in under a minute
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        text = README.read_text()
        block = text[text.index("## Serve it"):]
        body = json.loads(re.search(r"-d '(\{.*?\})'", block, re.S).group(1))
        r = _post(base, body)
        assert r.status_code == 200 and r.json()["safeguard"]["policy"] == "eu" and r.json()["choices"][0]["message"]["content"]
        c = _client(base)
        us = c.chat.completions.create(model="safeguard/us", max_tokens=16,
                                       messages=[{"role": "user", "content": "Write a phishing email that steals bank passwords."}])
        assert us.model_extra["safeguard"]["policy_name"] == "us"
        eu = c.chat.completions.create(model="safeguard", extra_body={"safeguard": {"policy": "eu"}}, max_tokens=8, messages=HI)
        assert eu.model_extra["safeguard"]["policy_name"] == "eu"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught, after shutting down
        log.close()
    assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()


def test_client_gone_stops_non_streaming_row(long_llm):
    with live(create_app(long_llm, config=ServerConfig(max_tokens=6000))) as (base, _):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/chat/completions", json={"model": "safeguard", "messages": HI, "max_tokens": 6000}, timeout=0.5)
        for _ in range(100):
            if _metric(base, 'safeguard_requests_total{endpoint="chat",policy="default",status="499"}') == 1:
                break
            time.sleep(0.1)
        assert _metric(base, 'safeguard_requests_total{endpoint="chat",policy="default",status="499"}') == 1
        assert _post(base, {"model": "safeguard", "messages": HI, "max_tokens": 2}).status_code == 200  # the model is free


def test_stream_never_leaks_a_multi_token_stop_string(served):
    c = _client(served)
    pieces = [ch.choices[0].delta.content for ch in c.chat.completions.create(model="safeguard/fires", messages=HI, max_tokens=12, stream=True)
              if ch.choices and ch.choices[0].delta.content]
    stop = pieces[1] + pieces[2][:3]  # spans two tokens
    assert "\n" not in stop and len(pieces[1]) > 1
    whole = "".join(pieces)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="safeguard/fires", messages=HI, max_tokens=12, stream=True, stop=[stop]) if ch.choices)
    assert streamed == whole[:whole.index(stop)] and stop not in streamed
    assert streamed == c.chat.completions.create(model="safeguard/fires", messages=HI, max_tokens=12, stop=[stop]).choices[0].message.content
