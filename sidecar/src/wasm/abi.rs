//! The proxy-wasm ABI (0.2.x, as Envoy and the SDKs speak it) from the host's side: the
//! functions a module imports from `env`, each reading and writing the module's memory
//! through checked offsets. Every value the module hands over is untrusted: an offset or
//! size outside its memory is `InvalidMemoryAccess`, never a host fault.
//!
//! What a call may touch is the [`Host`] of its store: the request's header maps and
//! properties (set by the session around each callback), the plugin's shared state, and
//! what the callback asks of the request (a local reply, a resume).

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmi::{Caller, Error, Extern, Linker, Memory};

use super::shared::PluginShared;

/// proxy-wasm's `WasmResult`.
pub mod status {
    pub const OK: i32 = 0;
    pub const NOT_FOUND: i32 = 1;
    pub const BAD_ARGUMENT: i32 = 2;
    pub const PARSE_FAILURE: i32 = 4;
    pub const INVALID_MEMORY_ACCESS: i32 = 6;
    pub const EMPTY: i32 = 7;
    pub const CAS_MISMATCH: i32 = 8;
    pub const UNIMPLEMENTED: i32 = 12;
}

/// Header maps by proxy-wasm's `MapType`.
const REQUEST_HEADERS: i32 = 0;
const REQUEST_TRAILERS: i32 = 1;
const RESPONSE_HEADERS: i32 = 2;
const RESPONSE_TRAILERS: i32 = 3;
const HTTP_CALL_RESPONSE_HEADERS: i32 = 6;
const HTTP_CALL_RESPONSE_TRAILERS: i32 = 7;

/// Buffers by proxy-wasm's `BufferType`.
const REQUEST_BODY: i32 = 0;
const RESPONSE_BODY: i32 = 1;
const HTTP_CALL_RESPONSE_BODY: i32 = 4;
const VM_CONFIGURATION: i32 = 6;
const PLUGIN_CONFIGURATION: i32 = 7;

/// At most this many bytes are read from a module in one argument (a header, a body
/// chunk, a log line): a module cannot make the host allocate without bound.
const MAX_ARGUMENT: usize = 1 << 20;

/// A header map as proxy-wasm sees it: ordered pairs, pseudo-headers (`:method`, `:path`,
/// `:authority`, `:scheme`, `:status`) first.
pub type Pairs = Vec<(String, Vec<u8>)>;

/// An answer a plugin gives in place of the upstream's (`proxy_send_local_response`).
#[derive(Debug, Clone)]
pub struct LocalReply {
    pub status: u16,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Pairs,
    /// A gRPC status for gRPC requests (-1: none given).
    pub grpc_status: i32,
}

/// Callouts one request may have in flight (`proxy_http_call`).
const MAX_CALLS: usize = 8;

/// An HTTP request a plugin asked the sidecar to make (`proxy_http_call`), answered by
/// `proxy_on_http_call_response`.
#[derive(Debug, Clone)]
pub struct Callout {
    pub token: u32,
    /// Envoy's cluster name (`outbound|80||host`) or a host, with or without its port.
    pub upstream: String,
    pub headers: Pairs,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
}

/// The request a callback runs for.
#[derive(Debug, Default)]
pub struct HttpState {
    pub request_headers: Pairs,
    pub request_trailers: Pairs,
    pub response_headers: Pairs,
    pub response_trailers: Pairs,
    /// Attributes the module may read (`request.path`, `source.principal`, ...), encoded
    /// as proxy-wasm returns them.
    pub properties: Arc<BTreeMap<String, Vec<u8>>>,
    /// Properties the module set for this request.
    pub set_properties: BTreeMap<String, Vec<u8>>,
    pub local_reply: Option<LocalReply>,
    /// Callouts asked for and not yet made.
    pub calls: Vec<Callout>,
    pub next_token: u32,
    /// The answer to the callout being delivered.
    pub call_response_headers: Pairs,
    pub call_response_trailers: Pairs,
    pub call_response_body: Vec<u8>,
    /// The plugin resumed the stream it paused (`proxy_continue_stream`).
    pub resumed: bool,
    /// The plugin changed the request's (response's) headers since they were last applied.
    pub request_headers_changed: bool,
    pub response_headers_changed: bool,
    /// The body bytes a body callback sees (and may change): what it buffered so far.
    pub request_body: Vec<u8>,
    pub response_body: Vec<u8>,
}

fn body(http: &mut HttpState, kind: i32) -> Option<&mut Vec<u8>> {
    match kind {
        REQUEST_BODY => Some(&mut http.request_body),
        RESPONSE_BODY => Some(&mut http.response_body),
        _ => None,
    }
}

/// What a module's store holds: the plugin it is an instance of, and the request being
/// served (if any).
pub struct Host {
    pub shared: Arc<PluginShared>,
    pub http: HttpState,
    pub limits: wasmi::StoreLimits,
    /// Set by `proxy_set_effective_context`; informational here (one request per store).
    pub effective_context: u32,
}

fn memory(caller: &Caller<'_, Host>) -> Option<Memory> {
    caller.get_export("memory").and_then(Extern::into_memory)
}

/// The module's bytes at `ptr..ptr+len`, if they are in its memory.
fn read(caller: &Caller<'_, Host>, ptr: i32, len: i32) -> Result<Vec<u8>, i32> {
    let (Ok(ptr), Ok(len)) = (usize::try_from(ptr), usize::try_from(len)) else {
        return Err(status::INVALID_MEMORY_ACCESS);
    };
    if len > MAX_ARGUMENT {
        return Err(status::BAD_ARGUMENT);
    }
    let mem = memory(caller).ok_or(status::INVALID_MEMORY_ACCESS)?;
    let data = mem.data(caller);
    data.get(ptr..ptr.checked_add(len).ok_or(status::INVALID_MEMORY_ACCESS)?)
        .map(<[u8]>::to_vec)
        .ok_or(status::INVALID_MEMORY_ACCESS)
}

fn read_string(caller: &Caller<'_, Host>, ptr: i32, len: i32) -> Result<String, i32> {
    String::from_utf8(read(caller, ptr, len)?).map_err(|_| status::BAD_ARGUMENT)
}

fn write(caller: &mut Caller<'_, Host>, ptr: i32, bytes: &[u8]) -> Result<(), i32> {
    let ptr = usize::try_from(ptr).map_err(|_| status::INVALID_MEMORY_ACCESS)?;
    let mem = memory(caller).ok_or(status::INVALID_MEMORY_ACCESS)?;
    mem.write(caller, ptr, bytes)
        .map_err(|_| status::INVALID_MEMORY_ACCESS)
}

fn write_u32(caller: &mut Caller<'_, Host>, ptr: i32, v: u32) -> Result<(), i32> {
    write(caller, ptr, &v.to_le_bytes())
}

/// Copies `bytes` into memory the module allocates (its `malloc`, or
/// `proxy_on_memory_allocate`), and writes where and how long at the two pointers.
fn hand_over(
    caller: &mut Caller<'_, Host>,
    bytes: &[u8],
    ret_ptr: i32,
    ret_size: i32,
) -> Result<i32, Error> {
    let alloc = caller
        .get_export("malloc")
        .or_else(|| caller.get_export("proxy_on_memory_allocate"))
        .and_then(Extern::into_func)
        .ok_or_else(|| Error::new("the module exports no malloc or proxy_on_memory_allocate"))?;
    let len = i32::try_from(bytes.len()).map_err(|_| Error::new("value too large"))?;
    let ptr = alloc.typed::<i32, i32>(&*caller)?.call(&mut *caller, len)?;
    if ptr == 0 && len > 0 {
        return Err(Error::new("the module's malloc returned null"));
    }
    let written = write(caller, ptr, bytes)
        .and_then(|()| write_u32(caller, ret_ptr, ptr as u32))
        .and_then(|()| write_u32(caller, ret_size, len as u32));
    Ok(match written {
        Ok(()) => status::OK,
        Err(s) => s,
    })
}

/// proxy-wasm's serialized map: count, then each key and value length, then each key and
/// value followed by a NUL.
pub fn encode_pairs(pairs: &Pairs) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// The inverse of [`encode_pairs`]; `None` for anything malformed.
pub fn decode_pairs(bytes: &[u8]) -> Option<Pairs> {
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let n = u32_at(0)?;
    if n > bytes.len() / 8 {
        return None;
    }
    let mut sizes = Vec::with_capacity(n);
    for i in 0..n {
        sizes.push((u32_at(4 + i * 8)?, u32_at(8 + i * 8)?));
    }
    let mut at = 4 + n * 8;
    let mut pairs = Vec::with_capacity(n);
    for (kl, vl) in sizes {
        let key = bytes.get(at..at.checked_add(kl)?)?;
        at += kl + 1;
        let value = bytes.get(at..at.checked_add(vl)?)?;
        at += vl + 1;
        pairs.push((String::from_utf8(key.to_vec()).ok()?, value.to_vec()));
    }
    Some(pairs)
}

fn map(http: &mut HttpState, map_type: i32) -> Option<&mut Pairs> {
    match map_type {
        REQUEST_HEADERS => Some(&mut http.request_headers),
        REQUEST_TRAILERS => Some(&mut http.request_trailers),
        RESPONSE_HEADERS => Some(&mut http.response_headers),
        RESPONSE_TRAILERS => Some(&mut http.response_trailers),
        HTTP_CALL_RESPONSE_HEADERS => Some(&mut http.call_response_headers),
        HTTP_CALL_RESPONSE_TRAILERS => Some(&mut http.call_response_trailers),
        _ => None,
    }
}

/// A header map a plugin is about to change: marked, so that an unchanged request or
/// response is not rebuilt after the callback.
fn map_mut(http: &mut HttpState, map_type: i32) -> Option<&mut Pairs> {
    match map_type {
        REQUEST_HEADERS => http.request_headers_changed = true,
        RESPONSE_HEADERS => http.response_headers_changed = true,
        _ => {}
    }
    map(http, map_type)
}

/// Header names are case-insensitive; proxy-wasm hands them over lower-cased.
fn same_name(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

macro_rules! try_status {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(s) => return Ok(s),
        }
    };
}

/// Defines every `env` function of the ABI on `linker`. Those not built yet answer
/// `Unimplemented` (modules that only import them still load).
pub fn define(linker: &mut Linker<Host>) -> Result<(), Error> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |caller: Caller<'_, Host>, level: i32, ptr: i32, len: i32| -> Result<i32, Error> {
            let msg = try_status!(read(&caller, ptr, len));
            let msg = String::from_utf8_lossy(&msg);
            let plugin = &caller.data().shared.name;
            match level {
                0 => tracing::trace!(target: "wasm", %plugin, "{msg}"),
                1 => tracing::debug!(target: "wasm", %plugin, "{msg}"),
                2 => tracing::info!(target: "wasm", %plugin, "{msg}"),
                3 => tracing::warn!(target: "wasm", %plugin, "{msg}"),
                _ => tracing::error!(target: "wasm", %plugin, "{msg}"),
            }
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut caller: Caller<'_, Host>, ret: i32| -> Result<i32, Error> {
            let level = if tracing::enabled!(target: "wasm", tracing::Level::TRACE) {
                0
            } else if tracing::enabled!(target: "wasm", tracing::Level::DEBUG) {
                1
            } else if tracing::enabled!(target: "wasm", tracing::Level::INFO) {
                2
            } else {
                3
            };
            Ok(write_u32(&mut caller, ret, level)
                .err()
                .unwrap_or(status::OK))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut caller: Caller<'_, Host>, ret: i32| -> Result<i32, Error> {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            Ok(write(&mut caller, ret, &now.to_le_bytes())
                .err()
                .unwrap_or(status::OK))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |caller: Caller<'_, Host>, period: i32| -> i32 {
            caller.data().shared.set_tick_period(period as u32);
            status::OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut caller: Caller<'_, Host>,
         kind: i32,
         start: i32,
         max: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> Result<i32, Error> {
            let buffer = match kind {
                PLUGIN_CONFIGURATION => caller.data().shared.config.clone(),
                HTTP_CALL_RESPONSE_BODY => caller.data().http.call_response_body.clone(),
                REQUEST_BODY => caller.data().http.request_body.clone(),
                RESPONSE_BODY => caller.data().http.response_body.clone(),
                VM_CONFIGURATION => Vec::new(),
                _ => return Ok(status::NOT_FOUND),
            };
            let (Ok(start), Ok(max)) = (usize::try_from(start), usize::try_from(max)) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let end = start.saturating_add(max).min(buffer.len());
            if start >= end {
                // Nothing there (an empty configuration): an empty answer, as Envoy's.
                let r = write_u32(&mut caller, ret_ptr, 0)
                    .and_then(|()| write_u32(&mut caller, ret_size, 0));
                return Ok(r.err().unwrap_or(status::OK));
            }
            hand_over(&mut caller, &buffer[start..end], ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut caller: Caller<'_, Host>,
         kind: i32,
         start: i32,
         size: i32,
         ptr: i32,
         len: i32|
         -> Result<i32, Error> {
            let data = try_status!(read(&caller, ptr, len));
            let (Ok(start), Ok(size)) = (usize::try_from(start), usize::try_from(size)) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let Some(buffer) = body(&mut caller.data_mut().http, kind) else {
                return Ok(status::BAD_ARGUMENT);
            };
            // As Envoy: at 0, `size` bytes are replaced (all of them for a size past the
            // end); at or past the end, the data is appended; anywhere else is refused.
            if start == 0 {
                buffer.drain(..size.min(buffer.len()));
                buffer.splice(0..0, data);
            } else if start >= buffer.len() {
                buffer.extend_from_slice(&data);
            } else {
                return Ok(status::BAD_ARGUMENT);
            }
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut caller: Caller<'_, Host>,
         kind: i32,
         len_ptr: i32,
         flags_ptr: i32|
         -> Result<i32, Error> {
            let len = match kind {
                PLUGIN_CONFIGURATION => caller.data().shared.config.len(),
                HTTP_CALL_RESPONSE_BODY => caller.data().http.call_response_body.len(),
                _ => match body(&mut caller.data_mut().http, kind) {
                    Some(b) => b.len(),
                    None => return Ok(status::NOT_FOUND),
                },
            };
            let r = write_u32(&mut caller, len_ptr, len as u32)
                .and_then(|()| write_u32(&mut caller, flags_ptr, 0));
            Ok(r.err().unwrap_or(status::OK))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut caller: Caller<'_, Host>,
         kind: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> Result<i32, Error> {
            let Some(pairs) = map(&mut caller.data_mut().http, kind) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let bytes = encode_pairs(pairs);
            hand_over(&mut caller, &bytes, ret_ptr, ret_size)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut caller: Caller<'_, Host>, kind: i32, ptr: i32, len: i32| -> Result<i32, Error> {
            let bytes = try_status!(read(&caller, ptr, len));
            let Some(pairs) = decode_pairs(&bytes) else {
                return Ok(status::PARSE_FAILURE);
            };
            let Some(m) = map_mut(&mut caller.data_mut().http, kind) else {
                return Ok(status::BAD_ARGUMENT);
            };
            *m = pairs;
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut caller: Caller<'_, Host>, kind: i32, ret: i32| -> Result<i32, Error> {
            let Some(m) = map(&mut caller.data_mut().http, kind) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let size = encode_pairs(m).len() as u32;
            Ok(write_u32(&mut caller, ret, size)
                .err()
                .unwrap_or(status::OK))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut caller: Caller<'_, Host>,
         kind: i32,
         kptr: i32,
         klen: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> Result<i32, Error> {
            let key = try_status!(read_string(&caller, kptr, klen));
            let Some(m) = map(&mut caller.data_mut().http, kind) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let Some(value) = m
                .iter()
                .find(|(k, _)| same_name(k, &key))
                .map(|(_, v)| v.clone())
            else {
                return Ok(status::NOT_FOUND);
            };
            hand_over(&mut caller, &value, ret_ptr, ret_size)
        },
    )?;
    for (name, replace) in [
        ("proxy_add_header_map_value", false),
        ("proxy_replace_header_map_value", true),
    ] {
        linker.func_wrap(
            "env",
            name,
            move |mut caller: Caller<'_, Host>,
                  kind: i32,
                  kptr: i32,
                  klen: i32,
                  vptr: i32,
                  vlen: i32|
                  -> Result<i32, Error> {
                let key = try_status!(read_string(&caller, kptr, klen));
                let value = try_status!(read(&caller, vptr, vlen));
                let Some(m) = map_mut(&mut caller.data_mut().http, kind) else {
                    return Ok(status::BAD_ARGUMENT);
                };
                if replace {
                    m.retain(|(k, _)| !same_name(k, &key));
                }
                m.push((key.to_ascii_lowercase(), value));
                Ok(status::OK)
            },
        )?;
    }
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut caller: Caller<'_, Host>, kind: i32, kptr: i32, klen: i32| -> Result<i32, Error> {
            let key = try_status!(read_string(&caller, kptr, klen));
            let Some(m) = map_mut(&mut caller.data_mut().http, kind) else {
                return Ok(status::BAD_ARGUMENT);
            };
            m.retain(|(k, _)| !same_name(k, &key));
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut caller: Caller<'_, Host>,
         pptr: i32,
         plen: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> Result<i32, Error> {
            let path = try_status!(read(&caller, pptr, plen));
            // Segments are NUL-separated; a trailing NUL is allowed.
            let path = String::from_utf8_lossy(path.strip_suffix(b"\0").unwrap_or(&path))
                .replace('\0', ".");
            let host = caller.data();
            let value = host
                .http
                .set_properties
                .get(&path)
                .or_else(|| host.http.properties.get(&path))
                .or_else(|| host.shared.properties.get(&path))
                .cloned();
            match value {
                Some(v) => hand_over(&mut caller, &v, ret_ptr, ret_size),
                None => Ok(status::NOT_FOUND),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut caller: Caller<'_, Host>,
         pptr: i32,
         plen: i32,
         vptr: i32,
         vlen: i32|
         -> Result<i32, Error> {
            let path = try_status!(read(&caller, pptr, plen));
            let path = String::from_utf8_lossy(path.strip_suffix(b"\0").unwrap_or(&path))
                .replace('\0', ".");
            let value = try_status!(read(&caller, vptr, vlen));
            let props = &mut caller.data_mut().http.set_properties;
            if props.len() >= 64 && !props.contains_key(&path) {
                return Ok(status::BAD_ARGUMENT);
            }
            props.insert(path, value);
            Ok(status::OK)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut caller: Caller<'_, Host>,
         code: i32,
         dptr: i32,
         dlen: i32,
         bptr: i32,
         blen: i32,
         hptr: i32,
         hlen: i32,
         grpc_status: i32|
         -> Result<i32, Error> {
            let Some(status) = u16::try_from(code).ok().filter(|c| (200..=599).contains(c)) else {
                return Ok(status::BAD_ARGUMENT);
            };
            let details =
                String::from_utf8_lossy(&try_status!(read(&caller, dptr, dlen))).into_owned();
            let body = try_status!(read(&caller, bptr, blen));
            let headers = try_status!(read(&caller, hptr, hlen));
            let Some(headers) = decode_pairs(&headers) else {
                return Ok(status::PARSE_FAILURE);
            };
            caller.data_mut().http.local_reply = Some(LocalReply {
                status,
                details,
                body,
                headers,
                grpc_status,
            });
            Ok(status::OK)
        },
    )?;
    for name in ["proxy_continue_request", "proxy_continue_response"] {
        linker.func_wrap("env", name, |mut caller: Caller<'_, Host>| -> i32 {
            caller.data_mut().http.resumed = true;
            status::OK
        })?;
    }
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut caller: Caller<'_, Host>, _stream: i32| -> i32 {
            caller.data_mut().http.resumed = true;
            status::OK
        },
    )?;
    for name in ["proxy_clear_route_cache", "proxy_done"] {
        linker.func_wrap("env", name, |_: Caller<'_, Host>| -> i32 { status::OK })?;
    }
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |_: Caller<'_, Host>, _: i32| -> i32 { status::OK },
    )?;
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut caller: Caller<'_, Host>,
         uptr: i32,
         ulen: i32,
         hptr: i32,
         hlen: i32,
         bptr: i32,
         blen: i32,
         _tptr: i32,
         _tlen: i32,
         timeout_ms: i32,
         ret: i32|
         -> Result<i32, Error> {
            let upstream = try_status!(read_string(&caller, uptr, ulen));
            let headers = try_status!(read(&caller, hptr, hlen));
            let Some(headers) = decode_pairs(&headers) else {
                return Ok(status::PARSE_FAILURE);
            };
            let body = try_status!(read(&caller, bptr, blen));
            let has = |name: &str| headers.iter().any(|(k, _)| k == name);
            if upstream.is_empty() || !has(":path") || !has(":method") {
                return Ok(status::BAD_ARGUMENT);
            }
            let http = &mut caller.data_mut().http;
            if http.calls.len() >= MAX_CALLS {
                return Ok(status::BAD_ARGUMENT);
            }
            http.next_token = http.next_token.wrapping_add(1).max(1);
            let token = http.next_token;
            http.calls.push(Callout {
                token,
                upstream,
                headers,
                body,
                timeout_ms: timeout_ms as u32,
            });
            Ok(write_u32(&mut caller, ret, token)
                .err()
                .unwrap_or(status::OK))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut caller: Caller<'_, Host>, context: i32| -> i32 {
            caller.data_mut().effective_context = context as u32;
            status::OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut caller: Caller<'_, Host>,
         kptr: i32,
         klen: i32,
         ret_ptr: i32,
         ret_size: i32,
         ret_cas: i32|
         -> Result<i32, Error> {
            let key = try_status!(read_string(&caller, kptr, klen));
            let Some((value, cas)) = caller.data().shared.shared_data.get(&key) else {
                return Ok(status::NOT_FOUND);
            };
            let handed = hand_over(&mut caller, &value, ret_ptr, ret_size)?;
            if handed != status::OK {
                return Ok(handed);
            }
            Ok(write_u32(&mut caller, ret_cas, cas)
                .err()
                .unwrap_or(status::OK))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |caller: Caller<'_, Host>,
         kptr: i32,
         klen: i32,
         vptr: i32,
         vlen: i32,
         cas: i32|
         -> Result<i32, Error> {
            let key = try_status!(read_string(&caller, kptr, klen));
            let value = try_status!(read(&caller, vptr, vlen));
            Ok(caller.data().shared.shared_data.set(key, value, cas as u32))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut caller: Caller<'_, Host>, nptr: i32, nlen: i32, ret: i32| -> Result<i32, Error> {
            let name = try_status!(read_string(&caller, nptr, nlen));
            let id = caller.data().shared.queues.register(&name);
            Ok(write_u32(&mut caller, ret, id).err().unwrap_or(status::OK))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut caller: Caller<'_, Host>,
         _vptr: i32,
         _vlen: i32,
         nptr: i32,
         nlen: i32,
         ret: i32|
         -> Result<i32, Error> {
            let name = try_status!(read_string(&caller, nptr, nlen));
            let Some(id) = caller.data().shared.queues.resolve(&name) else {
                return Ok(status::NOT_FOUND);
            };
            Ok(write_u32(&mut caller, ret, id).err().unwrap_or(status::OK))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |caller: Caller<'_, Host>, id: i32, vptr: i32, vlen: i32| -> Result<i32, Error> {
            let value = try_status!(read(&caller, vptr, vlen));
            Ok(caller.data().shared.queues.enqueue(id as u32, value))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut caller: Caller<'_, Host>,
         id: i32,
         ret_ptr: i32,
         ret_size: i32|
         -> Result<i32, Error> {
            match caller.data().shared.queues.dequeue(id as u32) {
                Ok(value) => hand_over(&mut caller, &value, ret_ptr, ret_size),
                Err(s) => Ok(s),
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut caller: Caller<'_, Host>,
         kind: i32,
         nptr: i32,
         nlen: i32,
         ret: i32|
         -> Result<i32, Error> {
            let name = try_status!(read_string(&caller, nptr, nlen));
            let id = try_status!(caller.data().shared.metrics.define(kind, &name));
            Ok(write_u32(&mut caller, ret, id).err().unwrap_or(status::OK))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |caller: Caller<'_, Host>, id: i32, offset: i64| -> i32 {
            caller.data().shared.metrics.increment(id as u32, offset)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |caller: Caller<'_, Host>, id: i32, value: i64| -> i32 {
            caller.data().shared.metrics.record(id as u32, value as u64)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut caller: Caller<'_, Host>, id: i32, ret: i32| -> Result<i32, Error> {
            let value = try_status!(caller.data().shared.metrics.get(id as u32));
            Ok(write(&mut caller, ret, &value.to_le_bytes())
                .err()
                .unwrap_or(status::OK))
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_maps_round_trip_and_malformed_ones_are_refused() {
        let pairs: Pairs = vec![
            (":path".into(), b"/a".to_vec()),
            ("x-empty".into(), Vec::new()),
        ];
        let bytes = encode_pairs(&pairs);
        assert_eq!(decode_pairs(&bytes), Some(pairs));
        assert_eq!(decode_pairs(&bytes[..bytes.len() - 3]), None, "cut short");
        let mut huge = 1_000_000u32.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        assert_eq!(decode_pairs(&huge), None, "a count the bytes cannot hold");
    }
}
