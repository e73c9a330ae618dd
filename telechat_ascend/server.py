"""`telechat-ascend serve`: one process, one device, many users. A FastAPI app over the continuous-batching engine
(telechat_ascend.engine), which runs in its own thread; any backend that offers a BatchRunner serves.

Endpoints: POST /v1/chat/completions and /v1/completions (OpenAI conventions, SSE streaming), GET /v1/models,
/health, /metrics (Prometheus), and Tele-AI's published POST /telechat/gptDialog/v2 (streamed text) and /v4 (JSON).
Bad requests get 4xx JSON errors naming the parameter (gptDialog: the published codes, HTTP 200); past max_queue a
request gets 429 with Retry-After; the server stays up.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from telechat_ascend.engine import Engine, QueueFull, Request
from telechat_ascend.errors import TeleChatError
from telechat_ascend.openai_api import ApiError, chat_completion, text_completion
from telechat_ascend.telechat_api import FAILED, DialogRequestError, error_body, parse_dialog_request

MAX_BODY_BYTES = 1 << 20
DISCONNECT_CHECK_SECONDS = 0.5
CHAT_PAGE = Path(__file__).parent / "assets" / "chat.html"  # the web chat page: no CDN, works offline


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("telechat_requests", "requests by endpoint and outcome", ["endpoint", "status"],
                                registry=self.registry)
        self.queue = Gauge("telechat_queue_depth", "requests waiting for a batch row", registry=self.registry)
        self.batch = Gauge("telechat_batch_size", "requests in the running batch", registry=self.registry)
        self.tokens = Counter("telechat_generated_tokens", "tokens generated", registry=self.registry)
        self.tokens_per_s = Gauge("telechat_tokens_per_second", "generated tokens per second over the last 10 s",
                                  registry=self.registry)
        self.ttft = Histogram("telechat_time_to_first_token_seconds", "from arrival to the first token",
                              registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.recent: list[tuple[float, int]] = []

    def generated(self, count: int) -> None:
        now = time.time()
        self.tokens.inc(count)
        self.recent = [(t, n) for t, n in self.recent if now - t < 10] + [(now, count)]
        self.tokens_per_s.set(sum(n for _, n in self.recent) / 10)


def create_app(engine: Engine, tokenizer, model_name: str, defaults: dict, seq_length: int | None,
               api_key: str | None = None):
    metrics = Metrics()
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app):
        worker = threading.Thread(target=engine.run, args=(stop,), name="telechat-engine", daemon=True)
        worker.start()
        yield
        stop.set()
        worker.join()

    app = FastAPI(title="telechat-ascend", lifespan=lifespan)

    def error(exc: ApiError, endpoint: str) -> JSONResponse:
        metrics.requests.labels(endpoint, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def read_json(http: HttpRequest) -> Any:
        if api_key is not None and http.headers.get("authorization") != f"Bearer {api_key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", kind="authentication_error")
        body = b""
        async for part in http.stream():
            body += part
            if len(body) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON ({exc})") from None

    def submit(prompt: list[int], params) -> Request:
        loop, woken = asyncio.get_running_loop(), asyncio.Event()
        try:
            request = engine.submit(prompt, params, listener=lambda: loop.call_soon_threadsafe(woken.set))
        except QueueFull as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        except TeleChatError as exc:
            raise ApiError(400, str(exc), "max_tokens" if "max_tokens" in str(exc) else "messages") from None
        metrics.queue.set(len(engine.waiting))
        request.woken = woken
        return request

    async def events(request: Request, http: HttpRequest):
        """The request's events as they come; a client that went away cancels it (its row is freed)."""
        try:
            while True:
                request.woken.clear()  # before draining, so a wake-up during the drain is not lost
                batch = request.next_events(timeout=0)
                metrics.batch.set(len(engine.running))
                metrics.queue.set(len(engine.waiting))
                for event in batch:
                    if event.token is not None:
                        metrics.generated(1)
                    yield event
                if request.finished and not request.events:
                    return
                if not batch:
                    try:  # the engine thread wakes us as soon as there is more; the timeout checks the client
                        await asyncio.wait_for(request.woken.wait(), DISCONNECT_CHECK_SECONDS)
                    except asyncio.TimeoutError:
                        pass
                if await http.is_disconnected():
                    engine.cancel(request)
                    return
        finally:
            if not request.finished:
                engine.cancel(request)
            elif request.first_token_at is not None:
                metrics.ttft.observe(request.first_token_at - request.arrived)

    def usage(request: Request) -> dict[str, int]:
        return {"prompt_tokens": len(request.prompt), "completion_tokens": len(request.output),
                "total_tokens": len(request.prompt) + len(request.output)}

    def finish_reason(request: Request) -> str:
        return "length" if request.finish_reason == "length" else "stop"

    async def openai(http: HttpRequest, endpoint: str, chat: bool):
        try:
            body = await read_json(http)
            completion = chat_completion(body, tokenizer, defaults, seq_length) if chat else \
                text_completion(body, tokenizer, defaults)
            request = submit(completion.prompt, completion.params)
        except ApiError as exc:
            return error(exc, endpoint)
        metrics.requests.labels(endpoint, "200").inc()
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if not completion.stream:
            async for _ in events(request, http):
                pass
            choice = {"index": 0, "finish_reason": finish_reason(request), "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": request.text}} if chat else
                          {"text": request.text})
            return JSONResponse({"id": ident, "object": kind, "created": created, "model": model_name,
                                 "choices": [choice], "usage": usage(request)})

        def chunk(delta: dict | None = None, text: str | None = None, reason: str | None = None, **extra) -> str:
            choice = {"index": 0, "finish_reason": reason, "logprobs": None}
            choice.update({"delta": delta} if chat else {"text": text or ""})
            payload = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created,
                       "model": model_name, "choices": [choice], **extra}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def stream():
            if chat:
                yield chunk({"role": "assistant", "content": ""})
            async for event in events(request, http):
                reason = finish_reason(request) if event.finish_reason else None
                if event.text or reason:
                    yield chunk({"content": event.text} if event.text else {}, event.text, reason)
            if completion.include_usage:
                payload = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created,
                           "model": model_name, "choices": [], "usage": usage(request)}
                yield f"data: {json.dumps(payload)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await openai(http, "chat", chat=True)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await openai(http, "completions", chat=False)

    @app.get("/")
    async def chat_page():
        return HTMLResponse(CHAT_PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "telechat-ascend"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting)}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode())

    async def dialog(http: HttpRequest, endpoint: str):
        """Tele-AI's gptDialog contract: errors as {"code", ...} bodies with HTTP 200, as the published service."""
        try:
            prompt, params = parse_dialog_request(await read_json(http)).prompt_and_params(tokenizer)
        except DialogRequestError as exc:
            metrics.requests.labels(endpoint, str(exc.code)).inc()
            return JSONResponse(exc.body())
        except ApiError as exc:
            return error(exc, endpoint)
        try:
            request = submit(prompt, params)
        except ApiError:
            metrics.requests.labels(endpoint, str(FAILED)).inc()
            return JSONResponse(error_body(FAILED))
        metrics.requests.labels(endpoint, "200").inc()
        if endpoint == "gptDialog/v4":
            async for _ in events(request, http):
                pass
            return JSONResponse({"role": "bot", "content": request.text})

        async def text():
            async for event in events(request, http):
                if event.text:
                    yield event.text
        return StreamingResponse(text(), media_type="text/html")

    @app.post("/telechat/gptDialog/v2")
    async def gpt_dialog_v2(http: HttpRequest):
        return await dialog(http, "gptDialog/v2")

    @app.post("/telechat/gptDialog/v4")
    async def gpt_dialog_v4(http: HttpRequest):
        return await dialog(http, "gptDialog/v4")

    return app
