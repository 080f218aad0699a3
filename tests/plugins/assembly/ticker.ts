// Timers, shared data and shared queues: the root context ticks every 50 ms and puts
// "tick <n>" on the queue "ticks"; told the queue is ready, it takes the message off and
// keeps it, with the count, in shared data. Every request gets both in headers
// (x-ticks, x-last-queued), read from shared data by the request's own context.
export * from "@solo-io/proxy-runtime/proxy";
import { RootContext, Context, registerRootContext, FilterHeadersStatusValues, stream_context } from "@solo-io/proxy-runtime";
import * as imports from "@solo-io/proxy-runtime/imports";

function setShared(key: string, value: string): void {
  const k = String.UTF8.encode(key);
  const v = String.UTF8.encode(value);
  imports.proxy_set_shared_data(changetype<usize>(k), k.byteLength, changetype<usize>(v), v.byteLength, 0);
}

function getShared(key: string): string {
  const k = String.UTF8.encode(key);
  // Where the host writes the value's address, its length and its version.
  const cells = new ArrayBuffer(12);
  const at = changetype<usize>(cells);
  if (imports.proxy_get_shared_data(changetype<usize>(k), k.byteLength, at, at + 4, at + 8) != 0) {
    return "none";
  }
  return String.UTF8.decodeUnsafe(load<u32>(at) as usize, load<u32>(at + 4) as usize);
}

function queueId(name: string): u32 {
  const n = String.UTF8.encode(name);
  const cell = new ArrayBuffer(4);
  imports.proxy_register_shared_queue(changetype<usize>(n), n.byteLength, changetype<usize>(cell));
  return load<u32>(changetype<usize>(cell));
}

function dequeue(id: u32): string {
  const cells = new ArrayBuffer(8);
  const at = changetype<usize>(cells);
  if (imports.proxy_dequeue_shared_queue(id, at, at + 4) != 0) {
    return "";
  }
  return String.UTF8.decodeUnsafe(load<u32>(at) as usize, load<u32>(at + 4) as usize);
}

class TickerRoot extends RootContext {
  ticks: u32 = 0;
  queue: u32 = 0;
  onConfigure(configuration_size: u32): bool {
    super.onConfigure(configuration_size);
    this.queue = queueId("ticks");
    imports.proxy_set_tick_period_milliseconds(50);
    return true;
  }
  onTick(): void {
    this.ticks++;
    const m = String.UTF8.encode("tick " + this.ticks.toString());
    imports.proxy_enqueue_shared_queue(this.queue, changetype<usize>(m), m.byteLength);
  }
  onQueueReady(token: u32): void {
    let last = "";
    let message = dequeue(token);
    while (message != "") {
      last = message;
      message = dequeue(token);
    }
    if (last != "") {
      setShared("last", last);
      setShared("ticks", this.ticks.toString());
    }
  }
  createContext(context_id: u32): Context {
    return new Ticker(context_id, this);
  }
}

class Ticker extends Context {
  constructor(context_id: u32, root_context: TickerRoot) {
    super(context_id, root_context);
  }
  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.request.add("x-ticks", getShared("ticks"));
    stream_context.headers.request.add("x-last-queued", getShared("last"));
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => { return new TickerRoot(context_id); }, "ticker");
