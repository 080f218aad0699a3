// Traps on every request whose path contains "/trap" (as a buggy plugin would), and
// loops forever on "/loop"; other requests pass.
export * from "@solo-io/proxy-runtime/proxy";
import { RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context } from "@solo-io/proxy-runtime";

class TrapRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new Trap(context_id, this);
  }
}

class Trap extends Context {
  constructor(context_id: u32, root_context: TrapRoot) {
    super(context_id, root_context);
  }
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const path = stream_context.headers.request.get(":path");
    if (path.includes("/trap")) {
      unreachable();
    }
    let spins: u64 = 0;
    while (path.includes("/loop")) {
      spins++;
    }
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new TrapRoot(context_id); }, "trap");
