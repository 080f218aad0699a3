// Counts requests in a metric it defines, by method.
export * from "@solo-io/proxy-runtime/proxy";
import { RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context, Counter } from "@solo-io/proxy-runtime";

class CountRoot extends RootContext {
  requests: Counter | null = null;
  createContext(context_id: u32): Context {
    if (this.requests == null) {
      this.requests = new Counter("wasmcustom.requests_seen");
    }
    return new Count(context_id, this);
  }
}

class Count extends Context {
  root: CountRoot;
  constructor(context_id: u32, root_context: CountRoot) {
    super(context_id, root_context);
    this.root = root_context;
  }
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const c = this.root.requests;
    if (c != null) {
      c.increment(1);
    }
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new CountRoot(context_id); }, "count");
