"""An OTLP/HTTP trace receiver for tests (no collector server can be
installed here): accepts POST /v1/traces with an ExportTraceServiceRequest in
protobuf (application/x-protobuf), decoded with PyPI's opentelemetry-proto,
and prints `SPAN <json>` per span received: trace_id, span_id,
parent_span_id (hex), name, kind, attributes, status, links and the
resource's attributes. A request that breaks the format is answered 400 and
printed as `BAD <why>`. With --count (the benchmark), spans are decoded and
only counted: `SPANS <total>` after each request. With --discard (the
benchmark's cheapest receiver), the body is read and answered unparsed.

usage: otlp_receiver.py PORT [--count | --discard]"""
import gzip
import http.server
import json
import sys

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

port = int(sys.argv[1])
count_only = "--count" in sys.argv[2:]
discard = "--discard" in sys.argv[2:]
total = [0]


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind is None:
        return None
    return getattr(v, kind)


def attributes(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        why = None
        if discard:
            return self.accepted()
        if self.path != "/v1/traces":
            why = "path " + self.path
        elif self.headers.get("Content-Type") != "application/x-protobuf":
            why = "Content-Type " + str(self.headers.get("Content-Type"))
        req = ExportTraceServiceRequest()
        if why is None:
            try:
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                req.ParseFromString(body)
            except Exception as e:
                why = "body: %s" % e
        if why is not None:
            self.send_response(400)
            self.end_headers()
            print("BAD", why, flush=True)
            return
        if count_only:
            total[0] += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
            print("SPANS", total[0], flush=True)
        for rs in req.resource_spans if not count_only else []:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    print(
                        "SPAN",
                        json.dumps(
                            {
                                "resource": resource,
                                "scope": ss.scope.name,
                                "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(),
                                "parent_span_id": s.parent_span_id.hex(),
                                "name": s.name,
                                "kind": s.kind,
                                "start": s.start_time_unix_nano,
                                "end": s.end_time_unix_nano,
                                "attributes": attributes(s.attributes),
                                "status": {"code": s.status.code, "message": s.status.message},
                                "links": [
                                    {
                                        "trace_id": link.trace_id.hex(),
                                        "span_id": link.span_id.hex(),
                                        "attributes": attributes(link.attributes),
                                    }
                                    for link in s.links
                                ],
                            }
                        ),
                        flush=True,
                    )
        self.accepted()

    def accepted(self):
        """200 with an (empty) ExportTraceServiceResponse: all accepted."""
        out = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("0.0.0.0", port), H).serve_forever()
