"""An OpenAI-compatible chat-completions endpoint (the LLM of the scenario).

No model server can be installed on these machines, so this is a
protocol-level stand-in: it speaks the chat-completions API the official
`openai` client uses (POST /v1/chat/completions, GET /v1/models), counts
tokens (whitespace words) and answers from the context it was given.

usage: llm_server.py PORT
"""
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "enforcer-demo-llm"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "enforcer"}]})
        self._send(404, {"error": {"message": "not found"}})

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": "not found"}})
        length = int(self.headers.get("Content-Length", "0"))
        try:
            req = json.loads(self.rfile.read(length))
            messages = req["messages"]
        except (ValueError, KeyError) as e:
            return self._send(400, {"error": {"message": "bad request: %s" % e}})
        prompt = " ".join(m.get("content", "") for m in messages if isinstance(m.get("content"), str))
        context = [m["content"] for m in messages if m.get("role") == "system"]
        # The system message is a header line followed by the passages, best first.
        passages = context[0].splitlines()[1:] if context else []
        answer = "Based on the documentation: " + (passages[0] if passages else "I have no context.")
        prompt_tokens, completion_tokens = len(prompt.split()), len(answer.split())
        print("CHAT model=%s prompt_tokens=%d" % (req.get("model"), prompt_tokens), flush=True)
        self._send(200, {
            "id": "chatcmpl-%d" % int(time.time() * 1000), "object": "chat.completion", "created": int(time.time()),
            "model": req.get("model", MODEL),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    def log_message(self, fmt, *args):
        print("HTTP " + fmt % args, flush=True)


ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
