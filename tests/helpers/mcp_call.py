"""An MCP client of the L7 tests, the official `mcp` SDK's `Client` over
streamable HTTP. Prints one JSON object: the tools it was shown, and for each
call `TOOL=JSON-ARGS` given, its text or the error it raised.

usage: mcp_call.py URL [TOOL=JSON-ARGS ...]
"""
import asyncio
import json
import sys


async def main(url, calls):
    from mcp import Client

    out = {"calls": []}
    async with Client(url, read_timeout_seconds=10) as client:
        tools = await client.list_tools()
        out["tools"] = sorted(t.name for t in tools.tools)
        for call in calls:
            name, args = call.split("=", 1)
            try:
                r = await client.call_tool(name, json.loads(args))
                text = " ".join(getattr(c, "text", "") for c in r.content)
                out["calls"].append({"tool": name, "ok": not r.is_error, "text": text})
            except Exception as e:  # the SDK raises the JSON-RPC error
                out["calls"].append({"tool": name, "ok": False, "error": type(e).__name__, "text": str(e)})
    print(json.dumps(out), flush=True)


asyncio.run(main(sys.argv[1], sys.argv[2:]))
