"""An MCP client of the L7 tests, the official `mcp` SDK's `Client` over
streamable HTTP. Prints one JSON object: the tools it was shown, and for each
call `TOOL=JSON-ARGS` given, its text or the error it raised.

usage: mcp_call.py [--mode=auto|legacy] URL [TOOL=JSON-ARGS ...]

--mode is the SDK's: `auto` (the default) probes `server/discover` and speaks
the 2026-07-28 protocol (per-request envelopes, no session) when the server
does; `legacy` forces the initialize handshake (sessions, Mcp-Session-Id).
The negotiated version is printed as "protocol_version".
"""
import asyncio
import json
import sys


async def main(url, calls, mode):
    from mcp import Client

    out = {"calls": []}
    async with Client(url, read_timeout_seconds=10, mode=mode) as client:
        out["protocol_version"] = client.protocol_version
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


args = sys.argv[1:]
mode = "auto"
if args and args[0].startswith("--mode="):
    mode = args.pop(0).split("=", 1)[1]
asyncio.run(main(args[0], args[1:], mode))
