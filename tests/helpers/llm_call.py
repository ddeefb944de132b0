"""Calls an OpenAI-compatible API with the official `openai` client, as an
agent would, and prints one JSON line per call: what the client returned,
or the exception it raised (class, HTTP status, message, headers).

usage: llm_call.py BASE_URL CALL...
  CALL is JSON: {"op": "chat" | "completions" | "responses" | "embeddings" |
  "models" | "fine_tune", "model": ..., "prompt": ..., "stream": bool,
  "include_usage": bool, "max_tokens": n, "headers": {name: value}}
"""
import json
import sys

from openai import APIError, APIStatusError, OpenAI


def run(client, call, out):
    op, model = call["op"], call.get("model", "gpt-4o-mini")
    prompt = call.get("prompt", "count to 5")
    out.update(model=model, stream=bool(call.get("stream")))
    extra = {}
    if call.get("headers"):
        extra["extra_headers"] = call["headers"]
    if call.get("max_tokens"):
        extra["max_tokens"] = call["max_tokens"]
    if op == "chat":
        if call.get("include_usage"):
            extra["stream_options"] = {"include_usage": True}
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           stream=bool(call.get("stream")), **extra)
        if call.get("stream"):
            text, chunks, usage_keys = [], 0, 0
            out["text"] = ""
            try:
                for ch in r:
                    chunks += 1
                    usage_keys += "usage" in ch.to_dict()
                    if ch.choices and ch.choices[0].delta.content:
                        text.append(ch.choices[0].delta.content)
                    if ch.usage:
                        out["usage"] = ch.usage.to_dict()
            finally:
                out.update(text="".join(text), chunks=chunks, chunks_with_usage_key=usage_keys)
        else:
            out.update(text=r.choices[0].message.content, usage=r.usage.to_dict() if r.usage else None)
    elif op == "completions":
        r = client.completions.create(model=model, prompt=prompt, **extra)
        out.update(text=r.choices[0].text, usage=r.usage.to_dict())
    elif op == "responses":
        if call.get("stream"):
            with client.responses.stream(model=model, input=prompt) as s:
                for _ in s:
                    pass
                final = s.get_final_response()
        else:
            final = client.responses.create(model=model, input=prompt)
        out.update(text=final.output_text, usage=final.usage.to_dict())
    elif op == "embeddings":
        r = client.embeddings.create(model=model, input=[prompt])
        out.update(usage=r.usage.to_dict())
    elif op == "models":
        out["models"] = [m.id for m in client.models.list()]
    elif op == "fine_tune":
        out["job"] = client.fine_tuning.jobs.create(model=model, training_file="file-1").id


def main(base_url, *calls):
    client = OpenAI(base_url=base_url, api_key="not-used-enforcer-does-identity", max_retries=0, timeout=20)
    for raw in calls:
        call = json.loads(raw)
        out = {"op": call["op"]}
        try:
            run(client, call, out)
            out["ok"] = True
        except APIStatusError as e:
            out.update(ok=False, error=type(e).__name__, status=e.status_code, message=e.message,
                       retry_after=e.response.headers.get("retry-after"), body=e.body)
        except APIError as e:  # an error event inside a stream: what came before it is kept
            out.update(ok=False, error=type(e).__name__, message=e.message, body=e.body)
        if len(out.get("text") or "") > 10000:  # a huge answer: its length and end
            out.update(text_len=len(out["text"]), text="..." + out["text"][-200:])
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
