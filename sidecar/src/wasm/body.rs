//! Bodies and trailers through plugins, as they stream: each data frame is handed to
//! every plugin of the request (in chain order for requests, reverse for responses) with
//! what that plugin held back so far. A plugin that answers anything but Continue holds
//! the bytes (Envoy's StopIterationAndBuffer) until a later frame, or the end, lets them
//! go, possibly changed; a plugin may hold at most [`MAX_HELD`] bytes. Trailers go through
//! `proxy_on_*_trailers` after the held bytes are handed over with the end of the data.
//!
//! A body callback cannot pause for a callout (the bytes are on their way); its callouts
//! are answered as failed. A local reply from a request body callback ends the request's
//! body with an error and is what the caller gets (see [`super::take_reply`]); one from a
//! response body callback can only cut the response short, as in Envoy.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use super::vm::BodyVerdict;
use super::Entries;
use crate::pool::ProxyBody;

/// Bytes one plugin may hold back from a body.
pub const MAX_HELD: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PluginBodyError(pub String);

/// A body passed through the plugins of a request.
pub struct PluginBody {
    inner: ProxyBody,
    entries: Arc<Mutex<Entries>>,
    request: bool,
    out: VecDeque<Frame<Bytes>>,
    finished: bool,
}

impl PluginBody {
    pub fn new(inner: ProxyBody, entries: Arc<Mutex<Entries>>, request: bool) -> Self {
        Self {
            inner,
            entries,
            request,
            out: VecDeque::new(),
            finished: false,
        }
    }

    /// The `j`th of `n` plugins a frame meets: in chain order for a request, the reverse for
    /// a response.
    fn nth(&self, j: usize, n: usize) -> usize {
        if self.request {
            j
        } else {
            n - 1 - j
        }
    }

    /// Hands `data` (and, at the end, whatever is held) through the plugins; returns what
    /// goes on.
    fn feed(&mut self, data: Bytes, end_of_stream: bool) -> Result<Bytes, PluginBodyError> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let Entries {
            list,
            reply,
            failed,
        } = &mut *entries;
        let mut chunk: Vec<u8> = data.to_vec();
        let n = list.len();
        for j in 0..n {
            let e = &mut list[self.nth(j, n)];
            if e.off {
                continue;
            }
            e.held.append(&mut chunk);
            if e.held.len() > MAX_HELD {
                return Err(PluginBodyError(format!(
                    "WasmPlugin {} held more than {MAX_HELD} bytes of a body",
                    e.plugin.spec.name
                )));
            }
            let held = std::mem::take(&mut e.held);
            let http = e.session.http();
            if self.request {
                http.request_body = held;
            } else {
                http.response_body = held;
            }
            let verdict = e.session.body(self.request, end_of_stream);
            let http = e.session.http();
            let seen = std::mem::take(if self.request {
                &mut http.request_body
            } else {
                &mut http.response_body
            });
            match verdict {
                Ok(BodyVerdict::Continue) => chunk = seen,
                // At the end nothing can be held any longer.
                Ok(BodyVerdict::Buffer) if end_of_stream => chunk = seen,
                Ok(BodyVerdict::Buffer) => {
                    e.held = seen;
                    return Ok(Bytes::new());
                }
                Ok(BodyVerdict::Reply(r)) => {
                    *reply = Some(r);
                    return Err(PluginBodyError(format!(
                        "WasmPlugin {} answered the request from its body",
                        e.plugin.spec.name
                    )));
                }
                Err(fault) if e.plugin.spec.fail_open => {
                    e.plugin.counted_failure(
                        &fault,
                        "WasmPlugin failed on a body; it sees no more of it (FAIL_OPEN)",
                    );
                    e.off = true;
                    chunk = seen;
                }
                Err(fault) => {
                    e.plugin
                        .counted_failure(&fault, "WasmPlugin failed on a body (FAIL_CLOSE)");
                    *failed = Some(e.plugin.spec.name.clone());
                    return Err(PluginBodyError(format!(
                        "WasmPlugin {} failed",
                        e.plugin.spec.name
                    )));
                }
            }
        }
        Ok(Bytes::from(chunk))
    }

    fn trailers(&mut self, trailers: HeaderMap) -> Result<HeaderMap, PluginBodyError> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut pairs: super::abi::Pairs = trailers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        let n = entries.list.len();
        for j in 0..n {
            let e = &mut entries.list[self.nth(j, n)];
            if e.off {
                continue;
            }
            let http = e.session.http();
            if self.request {
                http.request_trailers = std::mem::take(&mut pairs);
            } else {
                http.response_trailers = std::mem::take(&mut pairs);
            }
            let verdict = e.session.trailers(self.request);
            let http = e.session.http();
            pairs = std::mem::take(if self.request {
                &mut http.request_trailers
            } else {
                &mut http.response_trailers
            });
            if let Err(fault) = verdict {
                if !e.plugin.spec.fail_open {
                    return Err(PluginBodyError(format!(
                        "WasmPlugin {} failed: {fault}",
                        e.plugin.spec.name
                    )));
                }
                e.off = true;
            }
        }
        let mut out = HeaderMap::new();
        for (k, v) in pairs {
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_bytes(&v),
            ) {
                out.append(name, value);
            }
        }
        Ok(out)
    }
}

impl Body for PluginBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(frame) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(frame)));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(f) => f,
            };
            match frame {
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = this.inner.is_end_stream();
                        let chunk = this.feed(data, end)?;
                        if !chunk.is_empty() {
                            this.out.push_back(Frame::data(chunk));
                        }
                        this.finished = end;
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            // Data held back goes first, then the trailers.
                            let chunk = this.feed(Bytes::new(), true)?;
                            if !chunk.is_empty() {
                                this.out.push_back(Frame::data(chunk));
                            }
                            let trailers = this.trailers(trailers)?;
                            this.out.push_back(Frame::trailers(trailers));
                            this.finished = true;
                        }
                    }
                },
                None => {
                    let chunk = this.feed(Bytes::new(), true)?;
                    if !chunk.is_empty() {
                        this.out.push_back(Frame::data(chunk));
                    }
                    this.finished = true;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.out.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        // Plugins may change the length.
        SizeHint::default()
    }
}
