//! Body helpers: boxing hyper bodies for forwarding, and small full bodies.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

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
