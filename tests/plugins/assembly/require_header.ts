// Refuses (403, answered by the sidecar) every request without the header its
// configuration names, e.g. {"header": "x-api-key"}; says who was refused.
export * from "@solo-io/proxy-runtime/proxy";
import { RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context, send_local_response, log, LogLevelValues } from "@solo-io/proxy-runtime";
import { get_property } from "@solo-io/proxy-runtime/runtime";

class RequireRoot extends RootContext {
  header: string = "";
  onConfigure(configuration_size: u32): bool {
    super.onConfigure(configuration_size);
    const config = this.getConfiguration();
    // {"header":"x-api-key"}: the value between the third and fourth quotes.
    const parts = config.split("\"");
    if (parts.length < 5 || parts[1] != "header") {
      log(LogLevelValues.error, "configuration names no header: " + config);
      return false;
    }
    this.header = parts[3];
    return true;
  }
  createContext(context_id: u32): Context {
    return new Require(context_id, this);
  }
}

class Require extends Context {
  root: RequireRoot;
  constructor(context_id: u32, root_context: RequireRoot) {
    super(context_id, root_context);
    this.root = root_context;
  }
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    if (stream_context.headers.request.get(this.root.header) != "") {
      return FilterHeadersStatusValues.Continue;
    }
    const caller = String.UTF8.decode(get_property("source.principal"));
    send_local_response(403, "missing-header", String.UTF8.encode("refused by require_header: no " + this.root.header + " from " + caller + "\n"), [], 16);
    return FilterHeadersStatusValues.StopIteration;
  }
}

registerRootContext((context_id: u32) => { return new RequireRoot(context_id); }, "require_header");
