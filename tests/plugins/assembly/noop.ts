// A plugin that does nothing, written against the proxy-wasm ABI directly (no SDK): what
// the host itself costs per request, for `isthmus bench wasm` and bench/run.sh.
export function proxy_abi_version_0_2_1(): void {}
export function proxy_on_vm_start(root: u32, size: u32): u32 { return 1; }
export function proxy_on_configure(root: u32, size: u32): u32 { return 1; }
export function proxy_on_context_create(context: u32, parent: u32): void {}
export function proxy_on_request_headers(context: u32, headers: u32, end: u32): u32 { return 0; }
export function proxy_on_request_body(context: u32, size: u32, end: u32): u32 { return 0; }
export function proxy_on_response_headers(context: u32, headers: u32, end: u32): u32 { return 0; }
export function proxy_on_response_body(context: u32, size: u32, end: u32): u32 { return 0; }
export function proxy_on_done(context: u32): u32 { return 1; }
export function proxy_on_log(context: u32): void {}
export function proxy_on_delete(context: u32): void {}
export function malloc(size: usize): usize { return __alloc(size, 0); }
