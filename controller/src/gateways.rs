//! The cluster's east-west gateways as the controller knows them: registered when a
//! gateway's discovery stream opens, gone when its last stream closes. The newest connected
//! gateway is the one sidecars use, and every connected one is exported to the federation.
//! The set is kept on disk so a restarted controller still routes across clusters before
//! its gateways reconnect; those entries, and the last gateway of a cluster whose gateway
//! went away, stay as a fallback only until a gateway connects.

use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct GatewayInfo {
    pub tunnel_address: String,
    pub quic_address: String,
    pub identity: String,
}

#[derive(Debug)]
struct Entry {
    info: GatewayInfo,
    /// Discovery streams open from it.
    streams: u32,
    /// Order of its latest connection; the newest serves.
    seq: u64,
    /// Peer clusters it cannot reach now, and since when (Unix seconds).
    down: BTreeMap<String, u64>,
}

#[derive(Debug)]
pub struct Gateways {
    entries: Vec<Entry>,
    next_seq: u64,
    file: PathBuf,
}

impl Gateways {
    /// The gateways an earlier run kept, as fallbacks.
    pub fn load(file: PathBuf) -> Self {
        let known: Vec<GatewayInfo> = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let entries = known
            .into_iter()
            .enumerate()
            .map(|(i, info)| Entry {
                info,
                streams: 0,
                seq: i as u64,
                down: BTreeMap::new(),
            })
            .collect::<Vec<_>>();
        Self {
            next_seq: entries.len() as u64,
            entries,
            file,
        }
    }

    pub fn connected(&mut self, info: GatewayInfo) {
        self.next_seq += 1;
        // A live gateway supersedes every fallback.
        self.entries.retain(|e| e.streams > 0 || e.info == info);
        match self.entries.iter_mut().find(|e| e.info == info) {
            Some(e) => {
                e.streams += 1;
                e.seq = self.next_seq;
            }
            None => self.entries.push(Entry {
                info,
                streams: 1,
                seq: self.next_seq,
                down: BTreeMap::new(),
            }),
        }
        self.save();
    }

    pub fn closed(&mut self, info: &GatewayInfo) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.info == *info) {
            e.streams = e.streams.saturating_sub(1);
            if e.streams == 0 {
                // What it could not reach is unknown from now on; nothing is avoided on
                // the word of a gateway that is gone.
                e.down.clear();
            }
        }
        let any_live = self.entries.iter().any(|e| e.streams > 0);
        if any_live {
            self.entries.retain(|e| e.streams > 0);
        }
        self.save();
    }

    /// Records the peer clusters `gw` cannot reach now; returns whether that changed.
    pub fn links(&mut self, gw: &GatewayInfo, down: &[String]) -> bool {
        let Some(e) = self.entries.iter_mut().find(|e| e.info == *gw) else {
            return false;
        };
        let now = isthmus_core::admin::unix_seconds(std::time::SystemTime::now());
        let next: BTreeMap<String, u64> = down
            .iter()
            .map(|c| (c.clone(), e.down.get(c).copied().unwrap_or(now)))
            .collect();
        let changed = next != e.down;
        e.down = next;
        changed
    }

    /// The clusters the serving gateway cannot reach, and since when.
    pub fn unreachable(&self) -> BTreeMap<String, u64> {
        let serving = self.serving();
        serving
            .first()
            .and_then(|gw| self.entries.iter().find(|e| e.info == *gw))
            .map(|e| e.down.clone())
            .unwrap_or_default()
    }

    /// The gateways to use, preferred first: connected ones newest first, else the
    /// fallbacks newest first.
    pub fn serving(&self) -> Vec<GatewayInfo> {
        let live = self.entries.iter().any(|e| e.streams > 0);
        let mut chosen: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| !live || e.streams > 0)
            .collect();
        chosen.sort_by_key(|e| std::cmp::Reverse(e.seq));
        chosen.into_iter().map(|e| e.info.clone()).collect()
    }

    fn save(&self) {
        let serving = self.serving();
        let bytes = serde_json::to_vec(&serving).expect("gateway list serializes");
        if let Err(e) = isthmus_core::fsutil::write_private(&self.file, &bytes) {
            tracing::warn!(error = %e, "cannot persist the gateway list");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(n: u8) -> GatewayInfo {
        GatewayInfo {
            tunnel_address: format!("127.0.0.{n}:15008"),
            quic_address: format!("127.0.0.{n}:15443"),
            identity: "spiffe://td/ns/isthmus-system/sa/isthmus-eastwestgateway".into(),
        }
    }

    #[test]
    fn a_gateway_serves_while_its_stream_is_open_and_the_newest_is_preferred() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("gateways.json");
        let mut g = Gateways::load(file.clone());
        g.connected(gw(9));
        g.connected(gw(2));
        assert_eq!(g.serving(), vec![gw(2), gw(9)], "newest first");
        g.closed(&gw(2));
        assert_eq!(
            g.serving(),
            vec![gw(9)],
            "a closed stream ends the registration"
        );
        g.closed(&gw(9));
        assert_eq!(g.serving(), vec![gw(9)], "the last one stays as a fallback");

        // A restarted controller starts from the fallback, until a gateway connects.
        let mut again = Gateways::load(file);
        assert_eq!(again.serving(), vec![gw(9)]);
        again.connected(gw(3));
        assert_eq!(again.serving(), vec![gw(3)]);
    }

    #[test]
    fn the_serving_gateways_unreachable_peers_keep_their_first_time_and_end_with_its_stream() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut g = Gateways::load(dir.path().join("gateways.json"));
        g.connected(gw(2));
        assert!(g.links(&gw(2), &["west".into()]));
        let since = g.unreachable()["west"];
        assert!(!g.links(&gw(2), &["west".into()]), "no change");
        assert!(g.links(&gw(2), &["west".into(), "eu".into()]));
        assert_eq!(
            g.unreachable()["west"],
            since,
            "still down since the first report"
        );
        assert!(
            !g.links(&gw(9), &["north".into()]),
            "an unknown gateway is ignored"
        );
        g.closed(&gw(2));
        assert!(
            g.unreachable().is_empty(),
            "a gone gateway's view is dropped"
        );
    }
}
