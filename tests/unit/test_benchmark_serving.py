"""benchmarks/serving.py (statistics, SSE client, reports) and benchmarks/baseline_server.py (request parsing,
the one-at-a-time streaming server on a tiny checkpoint). The benchmarks are scripts, not a package: they are
loaded from their files."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    module_name = f"_benchmarks_{name}"  # a private name: nothing else can shadow or be shadowed
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def serving():
    return _load("serving")


@pytest.fixture(scope="module")
def baseline():
    return _load("baseline_server")


def test_percentile_interpolates_like_numpy(serving):
    assert serving.percentile([1.0], 99) == 1.0
    assert serving.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert serving.percentile([float(v) for v in range(101)], 99) == pytest.approx(99.0)
    assert serving.percentile([0.0, 10.0], 99) == pytest.approx(9.9)


def test_summarise(serving):
    timings = [
        serving.Timing(start=0.0, end=1.0, first_content=0.1, last_content=0.9, prompt_tokens=10, completion_tokens=5),
        serving.Timing(start=0.5, end=2.0, first_content=0.8, last_content=2.0, prompt_tokens=20, completion_tokens=5),
    ]
    row = serving.summarise(timings, wall_s=2.0)
    assert row["requests"] == 2 and row["output_tokens"] == 10
    assert row["output_tokens_per_s"] == 5.0 and row["requests_per_s"] == 1.0
    assert row["mean_prompt_tokens"] == 15.0
    assert row["ttft_ms_mean"] == pytest.approx(200.0)  # 100 and 300 ms
    assert row["itl_ms_mean"] == pytest.approx(250.0)  # (0.8 s / 4 + 1.2 s / 4) / 2
    assert row["latency_s_p50"] == pytest.approx(1.25)


def test_summarise_without_content_has_no_ttft(serving):
    row = serving.summarise([serving.Timing(start=0.0, end=1.0, completion_tokens=1)], wall_s=1.0)
    assert row["ttft_ms_mean"] is None and row["itl_ms_mean"] is None


def test_ratios_markdown_and_plot(serving, tmp_path):
    rows = [
        {"workload": "text", "concurrency": c, "server": s, "output_tokens_per_s": v}
        for c, s, v in ((1, "ours", 40.0), (1, "baseline", 40.0), (16, "ours", 250.0), (16, "baseline", 50.0))
    ]
    serving.add_ratios(rows)
    assert [r.get("x_baseline") for r in rows] == [1.0, None, 5.0, None]
    assert serving.ratio_summary(rows) == "- text: C=1: 1.0x, C=16: 5.0x"
    table = serving.markdown_table(rows).splitlines()
    assert len(table) == 6 and table[0].count("|") == table[1].count("|") == len(serving.COLUMNS) + 1
    assert "| 5.0 |" in table[4] and "| - |" in table[5]
    for row in rows:
        row["load_1min"] = [1.0, 1.5]
    settings = {"device": "cpu", "model": "m", "checkpoint": "tiny", "dtype": "float32", "max_tokens": 64,
                "requests_per_level": 4, "workloads": ["text"], "engine_threads": 2, "baseline_threads": 2}  # fmt: skip
    hardware = {"cpu_model": "cpu", "usable_cores": 2, "logical_cores": 2, "memory_gib": 8, "gpu": None, "os": "x",
                "python": "3"}  # fmt: skip
    report = {"date": "2026-11-25T00:00:00+00:00", "runtime_s": 1.0, "settings": settings, "hardware": hardware,
              "results": rows}  # fmt: skip
    text = serving.render_markdown(report)
    assert "C=16: 5.0x" in text and "load average 1.0 at the first level, 1.5 at the last" in text
    pytest.importorskip("matplotlib")
    assert serving.plot(report, tmp_path / "plot.png")
    assert Image.open(tmp_path / "plot.png").size[0] > 500


def test_make_bodies(serving):
    text, image = (
        serving.make_bodies("text", range(3, 4), "m", 32)[0],
        serving.make_bodies("image", range(3, 4), "m", 32)[0],
    )
    for body in (text, image):
        assert body["stream"] and body["ignore_eos"] and body["min_tokens"] == body["max_tokens"] == 32
        assert body["temperature"] == 0 and body["repetition_penalty"] == 1.0
    url = image["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    page = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert page.size == (1344, 1344)
    assert serving.make_bodies("image", range(4, 5), "m", 32)[0] != image  # distinct pages


def test_parse_args_defaults(serving):
    cpu, gpu = serving.parse_args([]), serving.parse_args(["--device", "gpu"])
    assert cpu.concurrency == [1, 4, 16] and cpu.dtype == "float32" and cpu.name == "serving_cpu"
    assert gpu.concurrency == [1, 16, 64] and gpu.dtype == "auto" and gpu.name == "serving_gpu"
    with pytest.raises(SystemExit):
        serving.parse_args(["--workloads", "audio"])


def _sse(*events) -> bytes:
    lines = [f"data: {json.dumps(e)}\n\n" for e in events] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


def test_stream_chat_reads_content_and_usage(serving):
    def chunk(content=None, usage=None):
        choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
        return {"choices": choices, "usage": usage}

    body = _sse(chunk(""), chunk("a"), chunk("b"), chunk(usage={"prompt_tokens": 7, "completion_tokens": 3}))

    async def run():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
        async with httpx.AsyncClient(transport=transport, base_url="http://test/v1") as client:
            return await serving.stream_chat(client, {})

    timing = asyncio.run(run())
    assert timing.prompt_tokens == 7 and timing.completion_tokens == 3
    assert timing.start <= timing.first_content <= timing.last_content <= timing.end


def test_stream_chat_raises_on_errors(serving):
    async def run(response: httpx.Response):
        async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: response), base_url="http://t") as client:
            await serving.stream_chat(client, {})

    with pytest.raises(RuntimeError, match="HTTP 400"):
        asyncio.run(run(httpx.Response(400, json={"error": {"message": "bad"}})))
    with pytest.raises(RuntimeError, match="error event"):
        asyncio.run(run(httpx.Response(200, content=_sse({"error": {"message": "boom"}}))))


def test_baseline_parse_job(baseline):
    page = io.BytesIO()
    Image.new("RGB", (2000, 1000), "white").save(page, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(page.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "total?"}]
    job = baseline.parse_job({"messages": [{"role": "user", "content": content}], "max_tokens": 8, "min_tokens": 8,
                              "ignore_eos": True, "temperature": 0})  # fmt: skip
    assert job.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "total?"}]
    assert (job.max_tokens, job.min_tokens, job.ignore_eos) == (8, 8, True)
    image = baseline.decode_image(job.image_urls[0], 1344 * 1344)
    assert image.width * image.height <= 1344 * 1344 and image.width == 2 * image.height
    for bad in ({"messages": []}, {"messages": [{"role": "user", "content": "x"}], "temperature": 0.7},
                {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}):  # fmt: skip
        with pytest.raises(baseline.BadRequest):
            baseline.parse_job(bad)
    with pytest.raises(baseline.BadRequest):
        baseline.decode_image("https://example.com/a.png", 100)


def test_baseline_server_streams_fixed_length(baseline, tiny_full):
    from fastapi.testclient import TestClient

    app = baseline.create_app(baseline.Generator(tiny_full, "cpu", "float32"), "tiny")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Summarise the report."}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": 6, "min_tokens": 6, "ignore_eos": True}  # fmt: skip
    with TestClient(app) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 6 and chunks[-1]["choices"] == []
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        plain = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
        assert plain["usage"]["completion_tokens"] == 6 and plain["choices"][0]["finish_reason"] == "length"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert plain["choices"][0]["message"]["content"] == text  # greedy: the same tokens both ways
        assert client.post("/v1/chat/completions", json={**body, "temperature": 1}).status_code == 400
