//! The few WASI functions proxy-wasm modules import (SDKs link a libc or a runtime that
//! asks for them): standard output and error go to the sidecar's log, the clock and
//! randomness are the host's, the environment is the plugin's `vmConfig.env`, and exiting
//! (`proc_exit`, AssemblyScript's `abort`) traps. No file, socket or directory is
//! reachable. Any other import the module names is defined as a function that traps when
//! called, so that a module that never calls it still loads.

use wasmi::{Caller, Error, Extern, Linker, Module};

use super::abi::Host;

/// WASI's errno values used here.
const SUCCESS: i32 = 0;
const BADF: i32 = 8;
const INVAL: i32 = 28;

fn write_bytes(caller: &mut Caller<'_, Host>, ptr: i32, bytes: &[u8]) -> Result<(), i32> {
    let mem = caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or(INVAL)?;
    let ptr = usize::try_from(ptr).map_err(|_| INVAL)?;
    mem.write(caller, ptr, bytes).map_err(|_| INVAL)
}

fn read_bytes(caller: &Caller<'_, Host>, ptr: i32, len: usize) -> Result<Vec<u8>, i32> {
    let mem = caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or(INVAL)?;
    let ptr = usize::try_from(ptr).map_err(|_| INVAL)?;
    mem.data(caller)
        .get(ptr..ptr.checked_add(len).ok_or(INVAL)?)
        .map(<[u8]>::to_vec)
        .ok_or(INVAL)
}

fn u32_at(bytes: &[u8], at: usize) -> usize {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| u32::from_le_bytes(b) as usize)
}

fn errno(r: Result<(), i32>) -> i32 {
    r.err().unwrap_or(SUCCESS)
}

pub fn define(linker: &mut Linker<Host>, module: &Module) -> Result<(), Error> {
    for wasi in ["wasi_unstable", "wasi_snapshot_preview1"] {
        linker.func_wrap(
            wasi,
            "proc_exit",
            |_: Caller<'_, Host>, code: i32| -> Result<(), Error> {
                Err(Error::new(format!("the plugin exited (proc_exit {code})")))
            },
        )?;
        linker.func_wrap(
            wasi,
            "fd_write",
            |mut caller: Caller<'_, Host>, fd: i32, iovs: i32, n: i32, written: i32| -> i32 {
                if fd != 1 && fd != 2 {
                    return BADF;
                }
                let n = usize::try_from(n).unwrap_or(0).min(64);
                let Ok(list) = read_bytes(&caller, iovs, n * 8) else {
                    return INVAL;
                };
                let mut text = Vec::new();
                for i in 0..n {
                    let (ptr, len) = (u32_at(&list, i * 8), u32_at(&list, i * 8 + 4));
                    match read_bytes(&caller, ptr as i32, len.min(64 << 10)) {
                        Ok(b) => text.extend_from_slice(&b),
                        Err(e) => return e,
                    }
                }
                let plugin = caller.data().shared.name.clone();
                let line = String::from_utf8_lossy(&text);
                tracing::info!(target: "wasm", %plugin, fd, "{}", line.trim_end());
                errno(write_bytes(
                    &mut caller,
                    written,
                    &(text.len() as u32).to_le_bytes(),
                ))
            },
        )?;
        linker.func_wrap(
            wasi,
            "clock_time_get",
            |mut caller: Caller<'_, Host>, _clock: i32, _precision: i64, ret: i32| -> i32 {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                errno(write_bytes(&mut caller, ret, &now.to_le_bytes()))
            },
        )?;
        linker.func_wrap(
            wasi,
            "random_get",
            |mut caller: Caller<'_, Host>, ptr: i32, len: i32| -> i32 {
                let len = usize::try_from(len).unwrap_or(0).min(1 << 16);
                let bytes: Vec<u8> = (0..len).map(|_| rand::random()).collect();
                errno(write_bytes(&mut caller, ptr, &bytes))
            },
        )?;
        linker.func_wrap(
            wasi,
            "environ_sizes_get",
            |mut caller: Caller<'_, Host>, count: i32, size: i32| -> i32 {
                let env = &caller.data().shared.env;
                let n = env.len() as u32;
                let bytes: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
                errno(
                    write_bytes(&mut caller, count, &n.to_le_bytes()).and_then(|()| {
                        write_bytes(&mut caller, size, &(bytes as u32).to_le_bytes())
                    }),
                )
            },
        )?;
        linker.func_wrap(
            wasi,
            "environ_get",
            |mut caller: Caller<'_, Host>, ptrs: i32, buf: i32| -> i32 {
                let env: Vec<Vec<u8>> = caller
                    .data()
                    .shared
                    .env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}\0").into_bytes())
                    .collect();
                let mut at = buf;
                for (i, e) in env.iter().enumerate() {
                    let r =
                        write_bytes(&mut caller, ptrs + 4 * i as i32, &(at as u32).to_le_bytes())
                            .and_then(|()| write_bytes(&mut caller, at, e));
                    if let Err(e) = r {
                        return e;
                    }
                    at += e.len() as i32;
                }
                SUCCESS
            },
        )?;
        linker.func_wrap(
            wasi,
            "args_sizes_get",
            |mut caller: Caller<'_, Host>, count: i32, size: i32| -> i32 {
                errno(
                    write_bytes(&mut caller, count, &0u32.to_le_bytes())
                        .and_then(|()| write_bytes(&mut caller, size, &0u32.to_le_bytes())),
                )
            },
        )?;
        linker.func_wrap(
            wasi,
            "args_get",
            |_: Caller<'_, Host>, _: i32, _: i32| -> i32 { SUCCESS },
        )?;
    }
    // AssemblyScript's abort(message, file, line, column), when not mapped to proc_exit.
    let _ = linker.func_wrap(
        "env",
        "abort",
        |_: Caller<'_, Host>, _msg: i32, _file: i32, line: i32, column: i32| -> Result<(), Error> {
            Err(Error::new(format!(
                "the plugin aborted at line {line}, column {column}"
            )))
        },
    );
    for import in module.imports() {
        let wasmi::ExternType::Func(ty) = import.ty() else {
            continue;
        };
        let (m, name) = (import.module().to_owned(), import.name().to_owned());
        let what = format!("{m}.{name}");
        // An ABI call not built (gRPC callouts, foreign functions) answers Unimplemented,
        // which SDKs report as an error status; anything else traps.
        let status =
            m == "env" && name.starts_with("proxy_") && ty.results() == [wasmi::ValType::I32];
        // Already defined above or by the ABI: the error says so, and is not one.
        let _ = linker.func_new(&m, &name, ty.clone(), move |_, _, results| {
            if status {
                results[0] = wasmi::Val::I32(super::abi::status::UNIMPLEMENTED);
                return Ok(());
            }
            Err(Error::new(format!(
                "the plugin called {what}, which this sidecar does not provide"
            )))
        });
    }
    Ok(())
}
