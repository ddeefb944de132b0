// An MCP server of the L7 tests built with the official TypeScript SDK
// (@modelcontextprotocol/sdk, tests/node; `cargo xtask setup` installs it),
// as most MCP servers are: streamable HTTP on node:http, stateless (a server
// and transport per request, the SDK's own stateless pattern), the same two
// tools as mcp_tools.py. Each call it runs is printed (`CALL <tool> <args>`).
//
// usage: node mcp_server.mjs PORT [json]   (here, beside node_modules)
//   json: answer POSTs with JSON, not SSE (enableJsonResponse)
import http from "node:http";
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { z } from "zod";

const port = Number(process.argv[2]);
const json = process.argv[3] === "json";

function server() {
  const s = new McpServer({ name: "docs", version: "1.0.0" });
  s.registerTool(
    "search_docs",
    {
      description: "Search a collection of documents.",
      inputSchema: { query: z.string(), collection: z.string().default("support-docs") },
    },
    async ({ query, collection }) => {
      console.log(`CALL search_docs ${JSON.stringify({ query, collection })}`);
      return { content: [{ type: "text", text: `found '${query}' in ${collection}` }] };
    },
  );
  s.registerTool(
    "delete_doc",
    { description: "Delete a document for good.", inputSchema: { doc_id: z.string() } },
    async ({ doc_id }) => {
      console.log(`CALL delete_doc ${JSON.stringify({ doc_id })}`);
      return { content: [{ type: "text", text: `deleted ${doc_id}` }] };
    },
  );
  return s;
}

http
  .createServer(async (req, res) => {
    let body = "";
    for await (const chunk of req) body += chunk;
    let parsed;
    try {
      parsed = body ? JSON.parse(body) : undefined;
    } catch {
      res.writeHead(400, { "content-type": "application/json" });
      res.end(JSON.stringify({ jsonrpc: "2.0", id: null, error: { code: -32700, message: "Parse error" } }));
      return;
    }
    const transport = new StreamableHTTPServerTransport({
      sessionIdGenerator: undefined,
      enableJsonResponse: json,
    });
    const s = server();
    res.on("close", () => {
      transport.close();
      s.close();
    });
    await s.connect(transport);
    await transport.handleRequest(req, res, parsed);
  })
  .listen(port, "0.0.0.0", () => console.log(`MCP server (TypeScript SDK) listening on ${port} (json=${json})`));
