"""`telechat-ascend serve` as a user meets it: a real server process on loopback, talked to by the official `openai`
client and by plain HTTP (httpx). The model is a randomly initialised tiny TeleChat (its answers run to max_tokens,
which makes batching visible)."""

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from conftest import free_port
from telechat_ascend.initialize import init_checkpoint

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


class Server:
    def __init__(self, model: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "telechat_ascend.cli", "serve", "--model", str(model),
                                         "--port", str(self.port), *extra], cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while True:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.3)

    def post(self, path: str, body=None, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=120, **kwargs)

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / "tiny"
    init_checkpoint("tiny", folder, seed=3)
    return folder


@pytest.fixture(scope="module")
def server(model):
    running = Server(model, "--max-model-len", "512")
    yield running
    running.close()


def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


QUESTION = [{"role": "user", "content": "什么是5G？"}]


def test_openai_client_chat_stream_and_usage(server):
    openai = client(server)
    answer = openai.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and answer.usage.completion_tokens == 12
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 12
    chunks = list(openai.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_greedy_server_answers_are_the_chat_command_s(server, model):
    """Two turns of `telechat-ascend chat` against the same two turns sent to the server (the second with the
    first answer as history): the same text."""
    done = subprocess.run([sys.executable, "-m", "telechat_ascend.cli", "chat", "--model", str(model), "--question",
                           "你好", "--question", "什么是5G？", "--max-new-tokens", "16", "--no-do-sample"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = done.stdout.splitlines()[:2]
    openai = client(server)
    ask = [{"role": "user", "content": "你好"}]
    assert openai.chat.completions.create(model="tiny", messages=ask, max_tokens=16,
                                          temperature=0).choices[0].message.content == first
    again = openai.chat.completions.create(model="tiny", messages=ask + [{"role": "assistant", "content": first}]
                                           + QUESTION, max_tokens=16, temperature=0).choices[0].message.content
    assert again == second


def test_concurrent_greedy_answers_equal_sequential_ones(server):
    openai = client(server)
    questions = ["你好", "什么是5G？", "hello", "天气怎么样", "1 2 3", "中国电信"]
    sequential = [openai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}],
                                                 max_tokens=20, temperature=0).choices[0].message.content
                  for q in questions]
    results = [None] * len(questions)

    def ask(i):
        results[i] = openai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": questions[i]}],
                                                    max_tokens=20, temperature=0).choices[0].message.content
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == sequential
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'telechat_requests_total{endpoint="chat",status="200"}' in metrics
    assert "telechat_time_to_first_token_seconds_count" in metrics


def test_completions_models_and_health(server):
    openai = client(server)
    text = openai.completions.create(model="tiny", prompt="中国电信", max_tokens=5, temperature=0)
    assert text.object == "text_completion" and text.choices[0].finish_reason == "length"
    assert text.usage.completion_tokens == 5
    assert [m.id for m in openai.models.list().data] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


@pytest.mark.parametrize("body, status, param, message", [
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "must be one of user"),
    ({}, 400, "messages", "'messages' must be a non-empty list"),
    ({"messages": "hi"}, 400, "messages", "non-empty list"),
    ({"messages": QUESTION, "max_tokens": 0}, 400, "max_tokens", "'max_tokens' must be >= 1, got 0"),
    ({"messages": QUESTION, "max_tokens": -3}, 400, "max_tokens", "got -3"),
    ({"messages": QUESTION, "max_tokens": "ten"}, 400, "max_tokens", "must be an integer"),
    ({"messages": QUESTION, "temperature": 3}, 400, "temperature", "'temperature' must be >= 0 and <= 2"),
    ({"messages": QUESTION, "top_p": 0}, 400, "top_p", "'top_p' must be > 0 and <= 1"),
    ({"messages": QUESTION, "stream": "yes"}, 400, "stream", "'stream' must be true or false"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages", "the last message must be the user's"),
    ({"messages": [{"role": "user", "content": "字" * 600}], "max_tokens": 10}, 400, "max_tokens",
     "more than the server's max_model_len 512"),
])
def test_bad_requests_get_4xx_json_naming_the_parameter_and_the_server_stays_up(server, body, status, param,
                                                                              message):
    response = server.post("/v1/chat/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert server.post("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2}).status_code == 200


def test_malformed_and_oversized_bodies(server):
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=30)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = httpx.post(f"{server.url}/v1/chat/completions", content=b" " * (2 << 20), timeout=30)
    assert response.status_code == 413
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_client_that_goes_away_frees_its_row(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      json={"messages": QUESTION, "max_tokens": 400, "temperature": 0, "stream": True}) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.time() + 20
    while httpx.get(f"{server.url}/health").json()["running"]:
        assert time.time() < deadline, "the abandoned request still holds its row"
        time.sleep(0.2)


def test_published_gpt_dialog_endpoints(server):
    dialog = {"dialog": [{"role": "user", "content": "你好"}], "max_length": 24, "do_sample": False}
    answer = server.post("/telechat/gptDialog/v4", dialog).json()
    assert answer["role"] == "bot" and answer["content"]
    streamed = server.post("/telechat/gptDialog/v2", dialog)
    assert streamed.headers["content-type"].startswith("text/html") and streamed.text == answer["content"]
    for body, code in (({"messages": []}, "10301"), ({"dialog": [{"role": "bot", "content": "x"}]}, "10904"),
                       ({**dialog, "top_p": 1}, "10305")):
        response = server.post("/telechat/gptDialog/v2", body)
        assert response.status_code == 200 and response.json()["code"] == code


def test_api_key_and_a_full_queue(model):
    guarded = Server(model, "--api-key", "s3cret", "--max-batch-size", "1", "--max-queue", "1")
    try:
        assert client(guarded).api_key == "unused"
        response = guarded.post("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2})
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        headers = {"Authorization": "Bearer s3cret"}
        statuses, retry = [], []

        def ask():
            response = guarded.post("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 150},
                                    headers=headers)
            statuses.append(response.status_code)
            retry.append(response.headers.get("retry-after"))
        threads = [threading.Thread(target=ask) for _ in range(5)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        for thread in threads:
            thread.join(120)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
        assert all(r == "1" for s, r in zip(statuses, retry) if s == 429)
        body = json.loads(guarded.post("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2},
                                       headers=headers).text)
        assert body["choices"][0]["finish_reason"] == "length"
    finally:
        guarded.close()


def test_the_mindspore_backend_serves_the_same_greedy_answers(model, server):
    ms_server = Server(model, "--backend", "mindspore", "--max-model-len", "512")
    try:
        for question in ("你好", "什么是5G？"):
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": 12, "temperature": 0}
            torch_answer = server.post("/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
            ms_answer = ms_server.post("/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
            assert ms_answer == torch_answer
    finally:
        ms_server.close()


def test_web_chat_page_in_a_real_browser(server, tmp_path):
    """Headless Chromium (Debian's package) driven by Playwright: two turns typed into the page, each streamed
    answer rendered equal to the API's greedy answer for the same turns; a screenshot is kept for a person."""
    import shutil
    from playwright.sync_api import sync_playwright
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:  # .ci/run installs it; a user's machine may lack it
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    openai = client(server)
    first = openai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "你好"}],
                                           max_tokens=16, temperature=0).choices[0].message.content
    second = openai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "你好"}, {"role": "assistant", "content": first},
                                {"role": "user", "content": "什么是5G？"}],
        max_tokens=16, temperature=0).choices[0].message.content
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(server.url + "/")
        page.fill("#max_tokens", "16")
        page.fill("#temperature", "0")
        for number, question in enumerate(("你好", "什么是5G？"), start=1):
            page.fill("#question", question)
            page.click("#send")
            page.wait_for_selector(f".turn.bot:nth-of-type({2 * number})[data-done]", timeout=60000)
        answers = page.locator(".turn.bot").all_text_contents()
        questions = page.locator(".turn.user").all_text_contents()
        screenshot = REPO / "runs" / "screenshots"
        screenshot.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot / "chat-page.png"))
        # The stop button ends a long answer, and the server frees its row.
        page.fill("#max_tokens", "400")
        page.fill("#question", "再说一遍")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.turn.bot')[2].textContent.length > 0", timeout=60000)
        page.click("#stop")
        page.wait_for_selector(".turn.bot:nth-of-type(6)[data-done='stopped']", timeout=10000)
        browser.close()
    deadline = time.time() + 20
    while httpx.get(f"{server.url}/health").json()["running"]:
        assert time.time() < deadline, "the stopped answer still holds its row"
        time.sleep(0.2)
    assert questions == ["你好", "什么是5G？"]
    assert answers == [first, second]


def test_a_client_that_never_reads_its_stream_blocks_no_one(server):
    """A streaming client that sends its request and then reads nothing: the others are served meanwhile."""
    with socket.create_connection(("127.0.0.1", server.port)) as idle:
        body = json.dumps({"messages": QUESTION, "max_tokens": 300, "temperature": 0, "stream": True}).encode()
        idle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        began = time.time()
        answer = client(server).chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8,
                                                        temperature=0)
        assert answer.choices[0].finish_reason == "length" and time.time() - began < 30


def test_an_int8_folder_serves_the_chat_command_s_answer(model, tmp_path):
    from telechat_ascend.cli import main
    assert main(["quantize", "--method", "w8a16", "--model", str(model), "--out", str(tmp_path / "w8a16")]) == 0
    done = subprocess.run([sys.executable, "-m", "telechat_ascend.cli", "chat", "--model", str(tmp_path / "w8a16"),
                           "--question", "你好", "--max-new-tokens", "12", "--no-do-sample"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    int8 = Server(tmp_path / "w8a16")
    try:
        answer = int8.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "你好"}],
                                                    "max_tokens": 12, "temperature": 0}).json()
        assert answer["choices"][0]["message"]["content"] == done.stdout.splitlines()[0]
    finally:
        int8.close()
