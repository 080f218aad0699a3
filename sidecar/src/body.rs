//! Body helpers: boxing hyper bodies for forwarding, small full bodies, and [`Watched`],
//! which bounds the silence of a streaming body (Envoy's stream idle timeout) and records
//! whether the side that sent it broke it, so a client's fault is never blamed on the
//! destination.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};

use crate::pool::{BoxError, ProxyBody};

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Boxes any body for forwarding without copying it.
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// How a watched body broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyFault {
    /// Its sender broke it: disconnected, sent less than its length, a malformed chunk.
    Broken(String),
    /// Its sender sent nothing for the stream idle timeout.
    Idle(Duration),
}

impl std::fmt::Display for BodyFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyFault::Broken(e) => f.write_str(e),
            BodyFault::Idle(d) => write!(f, "no data for {d:?}"),
        }
    }
}

/// Where a watched body records its fault; read after the exchange failed to tell whose
/// fault it was.
pub type FaultCell = Arc<OnceLock<BodyFault>>;

/// A body whose sender may stay silent at most `idle` between frames. A fault (an error of
/// the inner body, or the silence) is returned as the body's error, and recorded in the
/// cell first when there is one. The timer exists only while the body waits, so a body
/// that never waits costs no timer.
pub struct Watched<B> {
    inner: B,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the timer runs for the current wait.
    armed: bool,
    fault: Option<FaultCell>,
}

impl<B> Watched<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            timer: None,
            armed: false,
            fault: None,
        }
    }

    /// Also records the fault in `fault`, for whoever must tell later whose it was.
    pub fn recording(inner: B, idle: Duration, fault: FaultCell) -> Self {
        Self {
            fault: Some(fault),
            ..Self::new(inner, idle)
        }
    }

    fn record(&self, fault: BodyFault) -> WatchedError {
        if let Some(cell) = &self.fault {
            let _ = cell.set(fault.clone());
        }
        WatchedError(fault)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WatchedError(pub BodyFault);

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = WatchedError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.armed = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Ready(Some(Err(e))) => {
                Poll::Ready(Some(Err(this.record(BodyFault::Broken(e.to_string())))))
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !this.armed {
                    timer.as_mut().reset(deadline);
                    this.armed = true;
                }
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(this.record(BodyFault::Idle(this.idle)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

use std::future::Future;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test(start_paused = true)]
    async fn a_silent_sender_is_cut_at_the_idle_timeout_and_blamed() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let body = StreamBody::new(tokio_stream_from(rx));
        let fault = FaultCell::default();
        let mut watched = Watched::recording(body, Duration::from_secs(5), fault.clone());
        tx.send(Ok(Frame::data(Bytes::from_static(b"a"))))
            .await
            .expect("open");
        assert!(watched.frame().await.expect("frame").is_ok());
        let started = tokio::time::Instant::now();
        let err = watched.frame().await.expect("an error").expect_err("idle");
        assert_eq!(err.0, BodyFault::Idle(Duration::from_secs(5)));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(fault.get(), Some(&BodyFault::Idle(Duration::from_secs(5))));
        drop(tx);
    }

    #[tokio::test]
    async fn a_broken_body_records_its_fault() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let fault = FaultCell::default();
        let mut watched = Watched::recording(
            StreamBody::new(tokio_stream_from(rx)),
            Duration::from_secs(5),
            fault.clone(),
        );
        tx.send(Err(std::io::Error::other("client went away")))
            .await
            .expect("open");
        assert!(watched.frame().await.expect("an error").is_err());
        assert_eq!(
            fault.get(),
            Some(&BodyFault::Broken("client went away".into()))
        );
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Unpin {
        Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
