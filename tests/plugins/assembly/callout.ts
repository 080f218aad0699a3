// Asks another mesh service before letting a request through: GET <path> on
// <upstream> (its configuration, {"upstream": ..., "path": ...}), pausing the request
// until the answer comes. A 200 lets it through with the answering cluster in
// x-policy-cluster; anything else refuses it with 403.
export * from "@solo-io/proxy-runtime/proxy";
import { RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context, send_local_response, continue_request, HeaderPair, Headers, WasmResultValues } from "@solo-io/proxy-runtime";
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

class CalloutRoot extends RootContext {
  upstream: string = "";
  path: string = "";
  onConfigure(configuration_size: u32): bool {
    super.onConfigure(configuration_size);
    // {"path":"/status/200","upstream":"policy.demo.svc.cluster.local"}
    const parts = this.getConfiguration().split("\"");
    if (parts.length < 9 || parts[1] != "path" || parts[5] != "upstream") {
      return false;
    }
    this.path = parts[3];
    this.upstream = parts[7];
    return true;
  }
  createContext(context_id: u32): Context {
    return new Callout(context_id, this);
  }
}

function pair(k: string, v: string): HeaderPair {
  return new HeaderPair(String.UTF8.encode(k), String.UTF8.encode(v));
}

function answered(origin: Context, headers: u32, body_size: usize, trailers: u32): void {
  const status = stream_context.headers.http_callback.get(":status");
  if (status != "200") {
    send_local_response(403, "callout-refused", String.UTF8.encode("policy said " + status + "\n"), [], 16);
    return;
  }
  const body = String.UTF8.decode(get_buffer_bytes(BufferTypeValues.HttpCallResponseBody, 0, body_size as u32));
  const at = body.indexOf("\"cluster\":\"");
  const cluster = at < 0 ? "?" : body.substring(at + 11, body.indexOf("\"", at + 11));
  stream_context.headers.request.add("x-policy-cluster", cluster);
  continue_request();
}

class Callout extends Context {
  root: CalloutRoot;
  constructor(context_id: u32, root_context: CalloutRoot) {
    super(context_id, root_context);
    this.root = root_context;
  }
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const headers: Headers = [pair(":method", "GET"), pair(":path", this.root.path), pair(":authority", this.root.upstream)];
    const result = this.root.httpCall(this.root.upstream, headers, new ArrayBuffer(0), [], 2000, this, answered);
    if (result != WasmResultValues.Ok) {
      send_local_response(503, "callout-failed", String.UTF8.encode("cannot ask the policy\n"), [], 14);
    }
    return FilterHeadersStatusValues.StopIteration;
  }
}

registerRootContext((context_id: u32) => { return new CalloutRoot(context_id); }, "callout");
