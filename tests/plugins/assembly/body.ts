// Reads and changes bodies as they stream, and adds a trailer:
// - request bodies (not gRPC) are held until their end, then upper-cased; one that says
//   "forbidden" is refused with 403 from its body;
// - JSON response bodies get a line appended at their end;
// - responses with trailers (gRPC) get x-wasm-trailer.
// Bodies change length, so the plugin drops content-length, as proxy-wasm plugins do.
export * from "@solo-io/proxy-runtime/proxy";
import { RootContext, Context, registerRootContext, FilterHeadersStatusValues, FilterDataStatusValues, FilterTrailersStatusValues, stream_context, send_local_response } from "@solo-io/proxy-runtime";
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

// @ts-ignore: decorator
@external("env", "proxy_set_buffer_bytes")
declare function proxy_set_buffer_bytes(typ: u32, start: u32, length: u32, ptr: usize, size: usize): u32;

function replace(typ: BufferTypeValues, start: u32, length: u32, text: string): void {
  const bytes = String.UTF8.encode(text);
  proxy_set_buffer_bytes(typ as u32, start, length, changetype<usize>(bytes), bytes.byteLength);
}

class BodyRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new BodyPlugin(context_id, this);
  }
}

class BodyPlugin extends Context {
  grpc: bool = false;
  json: bool = false;
  constructor(context_id: u32, root_context: BodyRoot) {
    super(context_id, root_context);
  }
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    this.grpc = stream_context.headers.request.get("content-type").startsWith("application/grpc");
    if (!this.grpc) {
      stream_context.headers.request.remove("content-length");
    }
    return FilterHeadersStatusValues.Continue;
  }
  onRequestBody(length: usize, end_of_stream: bool): FilterDataStatusValues {
    if (this.grpc) {
      return FilterDataStatusValues.Continue;
    }
    if (!end_of_stream) {
      return FilterDataStatusValues.StopIterationAndBuffer;
    }
    const body = String.UTF8.decode(get_buffer_bytes(BufferTypeValues.HttpRequestBody, 0, length as u32));
    if (body.includes("forbidden")) {
      send_local_response(403, "body-refused", String.UTF8.encode("refused by body: " + length.toString() + " bytes\n"), [], 16);
      return FilterDataStatusValues.StopIterationAndBuffer;
    }
    replace(BufferTypeValues.HttpRequestBody, 0, length as u32, body.toUpperCase());
    return FilterDataStatusValues.Continue;
  }
  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    this.json = stream_context.headers.response.get("content-type").startsWith("application/json");
    if (this.json) {
      stream_context.headers.response.remove("content-length");
    }
    return FilterHeadersStatusValues.Continue;
  }
  onResponseBody(length: usize, end_of_stream: bool): FilterDataStatusValues {
    if (this.json && end_of_stream) {
      replace(BufferTypeValues.HttpResponseBody, length as u32, 0, "\n-- seen by wasm\n");
    }
    return FilterDataStatusValues.Continue;
  }
  onResponseTrailers(a: u32): FilterTrailersStatusValues {
    stream_context.trailers.response.add("x-wasm-trailer", "seen");
    return FilterTrailersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new BodyRoot(context_id); }, "body");
