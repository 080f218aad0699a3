//! Any bytes at the start of a QUIC stream: the gateway reads a header or an error, within
//! its size limit, never panics.
#![no_main]

use isthmus_gateway::header::{read_header, MAX_HEADER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    rt.block_on(async {
        let mut input = data;
        if let Ok(h) = read_header(&mut input).await {
            let encoded = prost_len(&h);
            assert!(encoded <= MAX_HEADER);
        }
    });
});

fn prost_len(h: &isthmus_gateway::header::StreamHeader) -> usize {
    h.target_cluster.len() + h.namespace.len() + h.service.len() + h.source_identity.len() + h.source_cluster.len() + h.traceparent.len()
}
