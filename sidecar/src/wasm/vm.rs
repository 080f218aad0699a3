//! A plugin's module and its instances. Each request gets an instance of its own for its
//! whole life (taken from a pool of idle ones, or made), so a trap, a runaway loop or a
//! corrupted heap in one request's instance never reaches another request: an instance
//! that failed is dropped, never pooled. Each instance has its root context (configured
//! with the plugin's configuration when made) and one HTTP context at a time.
//!
//! Instances run on wasmi, an interpreter: no compiler in the sidecar, modules validated
//! before they run, fuel bounding every callback, and a memory cap per instance.

use std::sync::{Arc, Mutex, OnceLock};

use wasmi::{Config, Engine, Instance, Linker, Module, Store, StoreLimitsBuilder, TypedFunc};

use super::abi::{self, Host, HttpState};
use super::shared::PluginShared;

/// Instructions one callback may run (some tens of milliseconds of interpretation), plus
/// [`FUEL_PER_BYTE`] for each byte of body it is handed: a plugin that loops is stopped, and
/// its request is failed by its fail strategy, while one that works through a large body
/// has the time to.
const FUEL_PER_CALLBACK: u64 = 50_000_000;
const FUEL_PER_BYTE: u64 = 2_000;
/// Linear memory one instance may grow to.
const MAX_MEMORY: usize = 64 << 20;
/// Idle instances kept per plugin; more are made under load and dropped after.
const MAX_IDLE: usize = 64;
/// The root context's id in every instance; HTTP contexts count up from the next.
const ROOT_CONTEXT: i32 = 1;

/// What a request-side callback asks of the request.
#[derive(Debug)]
pub enum Verdict {
    Continue,
    /// Answer with this instead of asking the upstream.
    Reply(abi::LocalReply),
    /// Make these callouts and hand their answers over before going on.
    Call(Vec<abi::Callout>),
}

/// What a body callback asks of the body.
#[derive(Debug)]
pub enum BodyVerdict {
    /// Pass what it holds (possibly changed) on.
    Continue,
    /// Hold the bytes back and hand them over again with the next ones.
    Buffer,
    Reply(abi::LocalReply),
}

/// A callout's answer: its headers (with `:status`), body and trailers.
pub type CalloutAnswer = (abi::Pairs, Vec<u8>, abi::Pairs);

/// Why a plugin failed a request: it could not be loaded or instantiated, or it trapped.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct PluginFault(pub String);

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::default();
        config.consume_fuel(true);
        Engine::new(&config)
    })
}

/// A loaded module, ready to make instances.
pub struct Runtime {
    module: Module,
    linker: Linker<Host>,
    shared: Arc<PluginShared>,
    idle: Mutex<Vec<Vm>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("plugin", &self.shared.name)
            .finish()
    }
}

/// `proxy_on_http_call_response(context, token, headers, body size, trailers)`.
type CallResponse = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// `proxy_on_*_body(context, size, end_of_stream)` and `proxy_on_*_trailers(context, n)`.
type BodyCall = TypedFunc<(i32, i32, i32), i32>;
type TrailersCall = TypedFunc<(i32, i32), i32>;

struct Calls {
    context_create: TypedFunc<(i32, i32), ()>,
    request_body: Option<BodyCall>,
    response_body: Option<BodyCall>,
    request_trailers: Option<TrailersCall>,
    response_trailers: Option<TrailersCall>,
    call_response: Option<CallResponse>,
    tick: Option<TypedFunc<i32, ()>>,
    queue_ready: Option<TypedFunc<(i32, i32), ()>>,
    request_headers: TypedFunc<(i32, i32, i32), i32>,
    response_headers: TypedFunc<(i32, i32, i32), i32>,
    log: Option<TypedFunc<i32, ()>>,
    done: Option<TypedFunc<i32, i32>>,
    delete: Option<TypedFunc<i32, ()>>,
}

struct Vm {
    store: Store<Host>,
    calls: Calls,
    next_context: i32,
}

impl Runtime {
    /// Compiles (validates) `bytes` and makes one instance, so that a module that cannot
    /// run is refused at load, not at the first request.
    pub fn load(bytes: &[u8], shared: Arc<PluginShared>) -> Result<Arc<Self>, PluginFault> {
        let module = Module::new(engine(), bytes)
            .map_err(|e| PluginFault(format!("not a valid WebAssembly module: {e}")))?;
        let abi = module.exports().any(|e| {
            matches!(
                e.name(),
                "proxy_abi_version_0_2_0" | "proxy_abi_version_0_2_1"
            )
        });
        if !abi {
            return Err(PluginFault(
                "the module speaks no proxy-wasm ABI this sidecar runs (it exports neither proxy_abi_version_0_2_0 nor _0_2_1)".into(),
            ));
        }
        let mut linker = Linker::new(engine());
        abi::define(&mut linker).map_err(|e| PluginFault(e.to_string()))?;
        super::wasi::define(&mut linker, &module).map_err(|e| PluginFault(e.to_string()))?;
        let runtime = Arc::new(Runtime {
            module,
            linker,
            shared,
            idle: Mutex::default(),
        });
        let first = runtime.instantiate()?;
        runtime.checkin(first);
        Ok(runtime)
    }

    fn instantiate(&self) -> Result<Vm, PluginFault> {
        let fault = |what: &str, e: &dyn std::fmt::Display| PluginFault(format!("{what}: {e}"));
        let host = Host {
            shared: self.shared.clone(),
            http: HttpState::default(),
            limits: StoreLimitsBuilder::new()
                .memory_size(MAX_MEMORY)
                .instances(1)
                .build(),
            effective_context: 0,
        };
        let mut store = Store::new(engine(), host);
        store.limiter(|h| &mut h.limits);
        refuel(&mut store);
        let instance = self
            .linker
            .instantiate_and_start(&mut store, &self.module)
            .map_err(|e| fault("instantiating", &e))?;
        for init in ["_initialize", "_start"] {
            if let Ok(f) = instance.get_typed_func::<(), ()>(&store, init) {
                refuel(&mut store);
                f.call(&mut store, ())
                    .map_err(|e| fault(&format!("running {init}"), &e))?;
                break;
            }
        }
        let calls = calls(&store, &instance).map_err(|e| fault("the module's exports", &e))?;
        refuel(&mut store);
        calls
            .context_create
            .call(&mut store, (ROOT_CONTEXT, 0))
            .map_err(|e| fault("creating the root context", &e))?;
        let started: i32 = typed::<(i32, i32), i32>(&store, &instance, "proxy_on_vm_start")
            .map_err(|e| fault("proxy_on_vm_start", &e))?
            .call(&mut store, (ROOT_CONTEXT, 0))
            .map_err(|e| fault("proxy_on_vm_start", &e))?;
        if started == 0 {
            return Err(PluginFault(
                "the plugin refused to start (proxy_on_vm_start returned false)".into(),
            ));
        }
        refuel(&mut store);
        let size = self.shared.config.len() as i32;
        let configured: i32 = typed::<(i32, i32), i32>(&store, &instance, "proxy_on_configure")
            .map_err(|e| fault("proxy_on_configure", &e))?
            .call(&mut store, (ROOT_CONTEXT, size))
            .map_err(|e| fault("proxy_on_configure", &e))?;
        if configured == 0 {
            return Err(PluginFault(
                "the plugin refused its configuration (proxy_on_configure returned false)".into(),
            ));
        }
        Ok(Vm {
            store,
            calls,
            next_context: ROOT_CONTEXT + 1,
        })
    }

    fn checkin(&self, vm: Vm) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(vm);
        }
    }

    /// An instance for one request, with a new HTTP context on it.
    pub fn session(self: &Arc<Self>, http: HttpState) -> Result<Session, PluginFault> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut vm = match pooled {
            Some(vm) => vm,
            None => self.instantiate()?,
        };
        let context = vm.next_context;
        vm.next_context = vm.next_context.wrapping_add(1).max(ROOT_CONTEXT + 1);
        vm.store.data_mut().http = http;
        refuel(&mut vm.store);
        vm.calls
            .context_create
            .call(&mut vm.store, (context, ROOT_CONTEXT))
            .map_err(|e| PluginFault(format!("creating an HTTP context: {e}")))?;
        Ok(Session {
            runtime: self.clone(),
            vm: Some(vm),
            context,
            spare: HttpState::default(),
            resident: false,
        })
    }

    /// The plugin's resident instance: its root context gets the timer's ticks and the
    /// shared queues' notifications (`proxy_on_tick`, `proxy_on_queue_ready`), as the one
    /// root context of an Envoy worker would. Request instances get neither.
    pub fn resident(self: &Arc<Self>) -> Result<Session, PluginFault> {
        Ok(Session {
            runtime: self.clone(),
            vm: Some(self.instantiate()?),
            context: ROOT_CONTEXT,
            spare: HttpState::default(),
            resident: true,
        })
    }

    pub fn shared(&self) -> &Arc<PluginShared> {
        &self.shared
    }

    /// The linear memory an instance starts with, as the module declares it.
    pub fn linear_memory_bytes(&self) -> u64 {
        self.module
            .exports()
            .find_map(|e| match e.ty() {
                wasmi::ExternType::Memory(m) => Some(m.minimum() * 65_536),
                _ => None,
            })
            .unwrap_or(0)
    }
}

fn refuel(store: &mut Store<Host>) {
    // Fuel is on for every store of this engine, so setting it cannot fail.
    let _ = store.set_fuel(FUEL_PER_CALLBACK);
}

fn typed<P: wasmi::WasmParams, R: wasmi::WasmResults>(
    store: &Store<Host>,
    instance: &Instance,
    name: &str,
) -> Result<TypedFunc<P, R>, wasmi::Error> {
    instance.get_typed_func::<P, R>(store, name)
}

fn calls(store: &Store<Host>, instance: &Instance) -> Result<Calls, wasmi::Error> {
    Ok(Calls {
        context_create: typed(store, instance, "proxy_on_context_create")?,
        call_response: typed(store, instance, "proxy_on_http_call_response").ok(),
        tick: typed(store, instance, "proxy_on_tick").ok(),
        queue_ready: typed(store, instance, "proxy_on_queue_ready").ok(),
        request_body: typed(store, instance, "proxy_on_request_body").ok(),
        response_body: typed(store, instance, "proxy_on_response_body").ok(),
        request_trailers: typed(store, instance, "proxy_on_request_trailers").ok(),
        response_trailers: typed(store, instance, "proxy_on_response_trailers").ok(),
        request_headers: typed(store, instance, "proxy_on_request_headers")?,
        response_headers: typed(store, instance, "proxy_on_response_headers")?,
        log: typed(store, instance, "proxy_on_log").ok(),
        done: typed(store, instance, "proxy_on_done").ok(),
        delete: typed(store, instance, "proxy_on_delete").ok(),
    })
}

/// One request's HTTP context in an instance of its own. Dropping it ends the context
/// (`proxy_on_log`, `proxy_on_done`, `proxy_on_delete`) and pools the instance, unless a
/// callback failed.
pub struct Session {
    runtime: Arc<Runtime>,
    vm: Option<Vm>,
    context: i32,
    spare: HttpState,
    /// The resident root instance (see [`Runtime::resident`]): no HTTP context to end.
    resident: bool,
}

impl Session {
    /// The request as the plugin sees it. Once a callback failed, the instance is gone
    /// and this is an empty stand-in: nothing the failed plugin did is kept.
    pub fn http(&mut self) -> &mut HttpState {
        match &mut self.vm {
            Some(vm) => &mut vm.store.data_mut().http,
            None => &mut self.spare,
        }
    }

    fn vm_mut(&mut self) -> Result<&mut Vm, PluginFault> {
        self.vm
            .as_mut()
            .ok_or_else(|| PluginFault("the plugin failed earlier in this request".into()))
    }

    /// `proxy_on_request_headers`: the request headers are in [`Session::http`].
    pub fn request_headers(&mut self, end_of_stream: bool) -> Result<Verdict, PluginFault> {
        self.headers(true, end_of_stream)
    }

    /// `proxy_on_response_headers`: the response headers are in [`Session::http`].
    pub fn response_headers(&mut self, end_of_stream: bool) -> Result<Verdict, PluginFault> {
        self.headers(false, end_of_stream)
    }

    fn headers(&mut self, request: bool, end_of_stream: bool) -> Result<Verdict, PluginFault> {
        let context = self.context;
        let vm = self.vm_mut()?;
        let n = if request {
            vm.store.data().http.request_headers.len()
        } else {
            vm.store.data().http.response_headers.len()
        } as i32;
        let f = if request {
            vm.calls.request_headers
        } else {
            vm.calls.response_headers
        };
        refuel(&mut vm.store);
        let called = f.call(&mut vm.store, (context, n, i32::from(end_of_stream)));
        let side = if request { "request" } else { "response" };
        self.after(called.map(drop), &format!("proxy_on_{side}_headers"))
    }

    /// `proxy_on_tick` on the resident root context.
    pub fn tick(&mut self) -> Result<Verdict, PluginFault> {
        let vm = self.vm_mut()?;
        let Some(f) = vm.calls.tick else {
            return Ok(Verdict::Continue);
        };
        refuel(&mut vm.store);
        let called = f.call(&mut vm.store, ROOT_CONTEXT);
        self.after(called, "proxy_on_tick")
    }

    /// `proxy_on_queue_ready` on the resident root context.
    pub fn queue_ready(&mut self, queue: u32) -> Result<Verdict, PluginFault> {
        let vm = self.vm_mut()?;
        let Some(f) = vm.calls.queue_ready else {
            return Ok(Verdict::Continue);
        };
        refuel(&mut vm.store);
        let called = f.call(&mut vm.store, (ROOT_CONTEXT, queue as i32));
        self.after(called, "proxy_on_queue_ready")
    }

    /// `proxy_on_{request,response}_body` over the body bytes in [`Session::http`]:
    /// `Ok(true)` to go on, `Ok(false)` to keep buffering (any status but Continue).
    pub fn body(&mut self, request: bool, end_of_stream: bool) -> Result<BodyVerdict, PluginFault> {
        let context = self.context;
        let vm = self.vm_mut()?;
        let (f, len) = if request {
            (
                vm.calls.request_body,
                vm.store.data().http.request_body.len(),
            )
        } else {
            (
                vm.calls.response_body,
                vm.store.data().http.response_body.len(),
            )
        };
        let Some(f) = f else {
            return Ok(BodyVerdict::Continue);
        };
        let _ = vm
            .store
            .set_fuel(FUEL_PER_CALLBACK + FUEL_PER_BYTE * len as u64);
        let called = f.call(
            &mut vm.store,
            (context, len as i32, i32::from(end_of_stream)),
        );
        let what = if request {
            "proxy_on_request_body"
        } else {
            "proxy_on_response_body"
        };
        let status = match &called {
            Ok(s) => *s,
            Err(_) => 0,
        };
        match self.after(called.map(drop), what)? {
            Verdict::Reply(r) => Ok(BodyVerdict::Reply(r)),
            Verdict::Call(calls) => {
                // A body callback cannot wait: its callouts are answered as failed.
                for c in calls {
                    if let Verdict::Reply(r) = self.call_response(c.token, None)? {
                        return Ok(BodyVerdict::Reply(r));
                    }
                }
                Ok(BodyVerdict::Continue)
            }
            Verdict::Continue if status == 0 => Ok(BodyVerdict::Continue),
            Verdict::Continue => Ok(BodyVerdict::Buffer),
        }
    }

    /// `proxy_on_{request,response}_trailers` over the trailers in [`Session::http`].
    pub fn trailers(&mut self, request: bool) -> Result<Verdict, PluginFault> {
        let context = self.context;
        let vm = self.vm_mut()?;
        let (f, n) = if request {
            (
                vm.calls.request_trailers,
                vm.store.data().http.request_trailers.len(),
            )
        } else {
            (
                vm.calls.response_trailers,
                vm.store.data().http.response_trailers.len(),
            )
        };
        let Some(f) = f else {
            return Ok(Verdict::Continue);
        };
        refuel(&mut vm.store);
        let called = f.call(&mut vm.store, (context, n as i32));
        self.after(called.map(drop), "proxy_on_trailers")
    }

    /// Hands a callout's answer over (`None`: it failed or timed out, which the plugin is
    /// told as an answer with no headers, as Envoy does).
    pub fn call_response(
        &mut self,
        token: u32,
        answer: Option<CalloutAnswer>,
    ) -> Result<Verdict, PluginFault> {
        let vm = self.vm_mut()?;
        let Some(f) = vm.calls.call_response else {
            return Ok(Verdict::Continue);
        };
        let (headers, body, trailers) = answer.unwrap_or_default();
        let sizes = (
            headers.len() as i32,
            body.len() as i32,
            trailers.len() as i32,
        );
        let http = &mut vm.store.data_mut().http;
        http.call_response_headers = headers;
        http.call_response_body = body;
        http.call_response_trailers = trailers;
        refuel(&mut vm.store);
        let called = f.call(
            &mut vm.store,
            (ROOT_CONTEXT, token as i32, sizes.0, sizes.1, sizes.2),
        );
        let http = &mut vm.store.data_mut().http;
        http.call_response_headers = Vec::new();
        http.call_response_body = Vec::new();
        http.call_response_trailers = Vec::new();
        self.after(called, "proxy_on_http_call_response")
    }

    /// What a callback left the request with: a reply, callouts to make, or nothing.
    fn after(
        &mut self,
        called: Result<(), wasmi::Error>,
        what: &str,
    ) -> Result<Verdict, PluginFault> {
        if let Err(e) = called {
            // The instance may be half-way through anything: never reused.
            self.vm = None;
            return Err(PluginFault(format!("trapped in {what}: {e}")));
        }
        let http = self.http();
        if let Some(reply) = http.local_reply.take() {
            return Ok(Verdict::Reply(reply));
        }
        if !http.calls.is_empty() {
            return Ok(Verdict::Call(std::mem::take(&mut http.calls)));
        }
        // Paused with nothing to wait for, or resumed: the request goes on.
        http.resumed = false;
        Ok(Verdict::Continue)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.resident {
            return;
        }
        let Some(mut vm) = self.vm.take() else {
            return;
        };
        let context = self.context;
        let mut ok = true;
        if let Some(f) = vm.calls.log {
            refuel(&mut vm.store);
            ok &= f.call(&mut vm.store, context).is_ok();
        }
        if let Some(f) = vm.calls.done {
            refuel(&mut vm.store);
            ok &= f.call(&mut vm.store, context).is_ok();
        }
        if let Some(f) = vm.calls.delete {
            refuel(&mut vm.store);
            ok &= f.call(&mut vm.store, context).is_ok();
        }
        vm.store.data_mut().http = HttpState::default();
        if ok {
            self.runtime.checkin(vm);
        }
    }
}
