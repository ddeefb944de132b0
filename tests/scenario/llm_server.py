"""An OpenAI-compatible API server (the LLM of the scenario and the tests).

No model server can be installed on these machines, so this is a
protocol-level stand-in: it speaks the API as OpenAI documents it, so that
the official `openai` client works unchanged, streaming or not:
  GET  /v1/models, /v1/models/{id}
  POST /v1/chat/completions, /v1/completions   (stream: SSE chunks, the usage
       chunk when stream_options.include_usage, then [DONE])
  POST /v1/responses                            (stream: response.* events,
       usage in response.completed)
  POST /v1/embeddings
  GET/POST /v1/files, GET/POST /v1/fine_tuning/jobs
Tokens are whitespace-separated words. The answer is the first passage of
the system message (the scenario's retrieval context), or, when the last
user message says "count to N", the numbers 1..N; `max_tokens` cuts it.
Streams send one word per chunk, one chunk every CHUNK_MS milliseconds.
Each request is logged as one JSON line on stdout.

usage: llm_server.py PORT [--chunk-ms N] [--linger-ms N] [--stamp] [--gzip]
  --linger-ms: a stream stays open N ms after its last event ([DONE] or
  response.completed) before it ends (a slow server; the tests' clients
  may leave first).
  --stamp: each streamed chat or completions chunk also carries `x_sent_ns`,
  the server's CLOCK_MONOTONIC (ns) when it produced it (for the benchmark's
  per-chunk latency; clients ignore the extra member).
  --gzip: answers, streams too, are compressed when the client accepts gzip
  (Starlette's GZipMiddleware, as behind a compressing proxy or OpenAI's own
  API; the `openai` client accepts gzip); a request with `x-force-gzip: 1`
  is answered compressed whatever it accepts (a server that ignores
  Accept-Encoding).
A request with `x-omit-usage: 1` is answered (JSON) without `usage`.
"""
import asyncio
import json
import re
import socket
import sys
import time

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

MODELS = ["enforcer-demo-llm", "gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
CHUNK_MS = 5
LINGER_MS = 0
STAMP = False
FILES, JOBS = [], []


def log(**kw):
    print(json.dumps(kw), flush=True)


def words(text):
    return len(text.split())


def text_of(content):
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def answer_for(prompt_texts, system, max_tokens):
    last = prompt_texts[-1] if prompt_texts else ""
    m = re.search(r"count to (\d+)", last)
    if m:
        out = [str(i) for i in range(1, int(m.group(1)) + 1)]
    else:
        passages = system.splitlines()[1:] if system else []
        out = ("Based on the documentation: " + (passages[0] if passages else "I have no context.")).split()
    if max_tokens:
        out = out[:max_tokens]
    return out


def error(status, message, code=None):
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}},
                        status_code=status)


async def models(request):
    model = request.path_params.get("model")
    if model:
        if model not in MODELS:
            return error(404, "The model %r does not exist" % model, "model_not_found")
        return JSONResponse({"id": model, "object": "model", "created": 0, "owned_by": "enforcer"})
    return JSONResponse({"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "enforcer"}
                                                    for m in MODELS]})


def logged_stream(sid, events, words):
    """An SSE answer of `events` that logs how it ended: `stream_end` (all
    `words` sent) or `stream_aborted` (the client or its proxy went away)."""
    async def run():
        sent, finished = 0, False
        try:
            async for e in events:
                sent += 1
                yield e
            finished = True
            log(stream_end=sid, chunks=words)
        finally:
            if not finished:
                log(stream_aborted=sid, sent=sent)

    return StreamingResponse(run(), media_type="text/event-stream")


def sse(obj):
    return "data: %s\n\n" % json.dumps(obj)


async def completions(request):
    chat = request.url.path.endswith("/chat/completions")
    try:
        req = await request.json()
        model = req["model"]
        if chat:
            messages = req["messages"]
            texts = [text_of(m.get("content")) for m in messages]
            system = next((text_of(m.get("content")) for m in messages if m.get("role") == "system"), "")
        else:
            texts = [req["prompt"]] if isinstance(req["prompt"], str) else list(req["prompt"])
            system = ""
    except (ValueError, KeyError, TypeError) as e:
        return error(400, "bad request: %s" % e)
    stream = bool(req.get("stream"))
    include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
    max_tokens = req.get("max_tokens") or req.get("max_completion_tokens")
    out = answer_for(texts, system, max_tokens)
    prompt_tokens = sum(words(t) for t in texts)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(out),
             "total_tokens": prompt_tokens + len(out)}
    log(request=("chat" if chat else "completions"), model=model, stream=stream, include_usage=include_usage,
        prompt_tokens=prompt_tokens, completion_tokens=len(out))
    cid = "%s-%d" % ("chatcmpl" if chat else "cmpl", int(time.time() * 1000))
    obj = "chat.completion" if chat else "text_completion"
    created = int(time.time())
    if not stream:
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": " ".join(out)}, "finish_reason": "stop"}
        else:
            choice = {"index": 0, "text": " ".join(out), "finish_reason": "stop", "logprobs": None}
        answer = {"id": cid, "object": obj, "created": created, "model": model, "choices": [choice]}
        if request.headers.get("x-omit-usage") != "1":  # a server that reports no usage
            answer["usage"] = usage
        return JSONResponse(answer)

    async def gen():
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}
        for i, w in enumerate(out):
            if STAMP:
                extra["x_sent_ns"] = time.monotonic_ns()
            piece = w if i == 0 else " " + w
            if chat:
                delta = {"content": piece} if i else {"role": "assistant", "content": piece}
                choice = {"index": 0, "delta": delta, "finish_reason": None}
            else:
                choice = {"index": 0, "text": piece, "finish_reason": None, "logprobs": None}
            yield sse(dict({"id": cid, "object": chunk_obj, "created": created, "model": model,
                            "choices": [choice]}, **extra))
            await asyncio.sleep(CHUNK_MS / 1000)
        if STAMP:
            extra["x_sent_ns"] = time.monotonic_ns()
        last = {"index": 0, "delta": {}, "finish_reason": "stop"} if chat else \
            {"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}
        yield sse(dict({"id": cid, "object": chunk_obj, "created": created, "model": model, "choices": [last]}, **extra))
        if include_usage:
            yield sse({"id": cid, "object": chunk_obj, "created": created, "model": model, "choices": [],
                       "usage": usage})
        yield "data: [DONE]\n\n"
        if LINGER_MS:
            await asyncio.sleep(LINGER_MS / 1000)

    return logged_stream(cid, gen(), len(out))


async def responses(request):
    try:
        req = await request.json()
        model = req["model"]
        inp = req["input"]
        texts = [inp] if isinstance(inp, str) else [text_of(m.get("content")) for m in inp]
    except (ValueError, KeyError, TypeError) as e:
        return error(400, "bad request: %s" % e)
    out = answer_for(texts, req.get("instructions") or "", req.get("max_output_tokens"))
    prompt_tokens = sum(words(t) for t in texts)
    usage = {"input_tokens": prompt_tokens, "output_tokens": len(out), "total_tokens": prompt_tokens + len(out),
             "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
    stream = bool(req.get("stream"))
    log(request="responses", model=model, stream=stream, prompt_tokens=prompt_tokens, completion_tokens=len(out))
    rid, mid, created = "resp_%d" % int(time.time() * 1000), "msg_1", int(time.time())
    text = " ".join(out)

    def response(status, with_output):
        item = {"type": "message", "id": mid, "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
        return {"id": rid, "object": "response", "created_at": created, "status": status, "model": model,
                "output": [item] if with_output else [], "usage": usage if with_output else None,
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}

    if not stream:
        return JSONResponse(response("completed", True))

    async def gen():
        seq = 0

        def ev(kind, **body):
            nonlocal seq
            seq += 1
            return "event: %s\ndata: %s\n\n" % (kind, json.dumps(dict({"type": kind, "sequence_number": seq}, **body)))

        item = {"type": "message", "id": mid, "status": "in_progress", "role": "assistant", "content": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        yield ev("response.created", response=response("in_progress", False))
        yield ev("response.output_item.added", output_index=0, item=item)
        yield ev("response.content_part.added", item_id=mid, output_index=0, content_index=0, part=part)
        for i, w in enumerate(out):
            yield ev("response.output_text.delta", item_id=mid, output_index=0, content_index=0,
                     delta=w if i == 0 else " " + w, logprobs=[])
            await asyncio.sleep(CHUNK_MS / 1000)
        yield ev("response.output_text.done", item_id=mid, output_index=0, content_index=0, text=text, logprobs=[])
        done = dict(part, text=text)
        yield ev("response.content_part.done", item_id=mid, output_index=0, content_index=0, part=done)
        yield ev("response.output_item.done", output_index=0, item=dict(item, status="completed", content=[done]))
        yield ev("response.completed", response=response("completed", True))

    return logged_stream(rid, gen(), len(out))


async def embeddings(request):
    try:
        req = await request.json()
        inp = req["input"]
        texts = [inp] if isinstance(inp, str) else list(inp)
    except (ValueError, KeyError, TypeError) as e:
        return error(400, "bad request: %s" % e)
    n = sum(words(t) for t in texts if isinstance(t, str))
    log(request="embeddings", model=req.get("model"), prompt_tokens=n)
    data = [{"object": "embedding", "index": i, "embedding": [float(len(t) % 7), 0.5, 0.25]} for i, t in enumerate(texts)]
    return JSONResponse({"object": "list", "data": data, "model": req.get("model"),
                         "usage": {"prompt_tokens": n, "total_tokens": n}})


async def files(request):
    if request.method == "POST":
        form = await request.form()
        f = {"id": "file-%d" % (len(FILES) + 1), "object": "file", "bytes": 0, "created_at": int(time.time()),
             "filename": getattr(form.get("file"), "filename", "upload"), "purpose": form.get("purpose", "fine-tune")}
        FILES.append(f)
        log(request="files", method="POST")
        return JSONResponse(f)
    return JSONResponse({"object": "list", "data": FILES})


async def jobs(request):
    if request.method == "POST":
        req = await request.json()
        job = {"id": "ftjob-%d" % (len(JOBS) + 1), "object": "fine_tuning.job", "model": req.get("model"),
               "training_file": req.get("training_file"), "status": "queued", "created_at": int(time.time())}
        JOBS.append(job)
        log(request="fine_tuning", method="POST", model=req.get("model"))
        return JSONResponse(job)
    return JSONResponse({"object": "list", "data": JOBS, "has_more": False})


app = Starlette(routes=[
    Route("/v1/models", models),
    Route("/v1/models/{model:path}", models),
    Route("/v1/chat/completions", completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/responses", responses, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/files", files, methods=["GET", "POST"]),
    Route("/v1/fine_tuning/jobs", jobs, methods=["GET", "POST"]),
])

if __name__ == "__main__":
    port = int(sys.argv[1])
    if "--chunk-ms" in sys.argv:
        CHUNK_MS = int(sys.argv[sys.argv.index("--chunk-ms") + 1])
    if "--linger-ms" in sys.argv:
        LINGER_MS = int(sys.argv[sys.argv.index("--linger-ms") + 1])
    STAMP = "--stamp" in sys.argv
    # One dual-stack socket: IPv4 and IPv6 clients alike.
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    sock.listen(128)
    served = app
    if "--gzip" in sys.argv:
        from starlette.middleware.gzip import GZipMiddleware

        gzipped = GZipMiddleware(app, minimum_size=0, exclude_content_types=())

        async def served(scope, receive, send):
            if scope.get("type") == "http" and (b"x-force-gzip", b"1") in scope["headers"]:
                asked = b", ".join(v for k, v in scope["headers"] if k == b"accept-encoding")
                log(forced_gzip=True, accept_encoding=asked.decode("latin-1"))
                headers = [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]
                scope = dict(scope, headers=headers + [(b"accept-encoding", b"gzip")])
            await gzipped(scope, receive, send)
    uvicorn.Server(uvicorn.Config(served, log_level="warning")).run(sockets=[sock])
