"""An AI agent of the scenario, written against the official clients only:
`mcp` (streamable HTTP) to list and call the docs tool, `openai` for the chat
completion. It knows nothing about enforcer. Prints one JSON line.

usage: agent.py MCP_URL LLM_BASE_URL QUESTION [CALLS]
       agent.py --probe-vectordb HOST PORT      (try the vector DB directly)

It searches the collection `support-docs` for QUESTION, then makes the extra
tool CALLS (a JSON list of {"tool", "arguments"}), whether listed or not, and
reports for each its text or the error the server's side answered.
"""
import asyncio
import json
import sys


def probe_vectordb(host, port):
    import chromadb
    try:
        chromadb.HttpClient(host=host, port=int(port)).list_collections()
        print(json.dumps({"vectordb": "reachable"}))
    except Exception as e:
        print(json.dumps({"vectordb": "refused", "error": type(e).__name__}))
        sys.exit(3)


async def main(mcp_url, llm_url, question, calls="[]"):
    from mcp import Client
    from openai import OpenAI

    out = {"question": question}
    try:
        async with Client(mcp_url, read_timeout_seconds=10) as client:
            tools = await client.list_tools()
            out["tools"] = [t.name for t in tools.tools]
            result = await client.call_tool("search_docs", {"query": question, "collection": "support-docs"})
            out["documents"] = [c.text for c in result.content if getattr(c, "text", None)]
            out["calls"] = []
            for call in json.loads(calls):
                seen = {"tool": call["tool"], "arguments": call["arguments"]}
                try:
                    r = await client.call_tool(call["tool"], call["arguments"])
                    seen["ok"] = not r.is_error
                    seen["text"] = " ".join(getattr(c, "text", "") for c in r.content)
                except Exception as e:  # the SDK raises a JSON-RPC error
                    seen["ok"] = False
                    seen["error"] = str(e)
                out["calls"].append(seen)
    except BaseException as e:  # noqa: BLE001 - report what the agent saw
        out["mcp_error"] = type(e).__name__
    try:
        llm = OpenAI(base_url=llm_url, api_key="not-used-enforcer-does-identity", max_retries=0, timeout=10)
        context = "\n".join(out.get("documents", []))
        r = llm.chat.completions.create(
            model="enforcer-demo-llm",
            messages=[{"role": "system", "content": "Answer from these docs:\n" + context},
                      {"role": "user", "content": question}])
        out["answer"] = r.choices[0].message.content
        out["usage"] = {"prompt_tokens": r.usage.prompt_tokens, "completion_tokens": r.usage.completion_tokens}
    except Exception as e:  # noqa: BLE001
        out["llm_error"] = type(e).__name__
    print(json.dumps(out))
    sys.exit(0 if "answer" in out and "documents" in out else 3)


if __name__ == "__main__":
    if sys.argv[1] == "--probe-vectordb":
        probe_vectordb(sys.argv[2], sys.argv[3])
    else:
        asyncio.run(main(*sys.argv[1:5]))
