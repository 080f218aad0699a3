//! Virtual IPs for services that have no address of their own: a service only other
//! clusters run, a Service without a cluster IP outside Kubernetes, a ServiceEntry with
//! hosts and no `addresses`. The sidecar's DNS proxy answers their names with the virtual
//! IP, and a captured connection to it is routed to the service (locally or through the
//! gateways), as for a cluster IP.
//!
//! The range is Istio's for auto-allocated addresses, `240.240.0.0/16` (class E: never
//! routed, so an address that leaks out of a pod reaches nothing). Each name hashes to a
//! slot (FNV-1a, stable across releases and processes); names that collide take the next
//! free slot in the order of (slot, name). So an address stays the same for the life of
//! a service, except that removing one of two colliding services can move the other: a
//! caller then resolves the name again, as after any DNS change.
//! Headless Services are left alone: their names resolve to their endpoints. The
//! endpoints of a headless service in other clusters get one each, which their
//! per-endpoint names (`db-0.west.db.ns.svc.clusterset.local`) resolve to.

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// The first address of the range (its `/16` network).
pub const RANGE_START: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 0);
/// Usable slots: `.0.1` to `.255.254`.
const SLOTS: u32 = (1 << 16) - 2;

fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The allocation key of endpoint `endpoint` of `service` (`namespace/name`) in `cluster`.
pub fn endpoint_key(service: &str, cluster: &str, endpoint: &str) -> String {
    format!("{service}/{cluster}/{endpoint}")
}

/// An address for each name; at most [`SLOTS`] of them (further names get none).
pub fn allocate<'a>(names: impl IntoIterator<Item = &'a str>) -> HashMap<&'a str, Ipv4Addr> {
    let mut wanted: Vec<(u32, &str)> = names.into_iter().map(|n| (fnv1a(n) % SLOTS, n)).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut taken = vec![false; SLOTS as usize];
    let mut out = HashMap::with_capacity(wanted.len());
    for (slot, name) in wanted.into_iter().take(SLOTS as usize) {
        let free = (0..SLOTS)
            .map(|i| ((slot + i) % SLOTS) as usize)
            .find(|s| !taken[*s])
            .expect("fewer names than slots");
        taken[free] = true;
        out.insert(
            name,
            Ipv4Addr::from(u32::from(RANGE_START) + 1 + free as u32),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_name_gets_its_own_stable_address_in_the_range() {
        let names = ["demo/echo", "demo/hello", "shop/reviews"];
        let a = allocate(names);
        assert_eq!(a.len(), 3);
        let mut ips: Vec<_> = a.values().collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 3, "distinct addresses: {a:?}");
        for ip in a.values() {
            assert_eq!(ip.octets()[..2], [240, 240], "{ip}");
            assert!(ip.octets()[2..] != [0, 0] && ip.octets()[2..] != [255, 255]);
        }
        // The same name keeps its address whatever else is allocated with it.
        let b = allocate(["demo/hello", "other/thing", "x/y"]);
        assert_eq!(a["demo/hello"], b["demo/hello"]);
    }

    #[test]
    fn colliding_names_both_get_an_address() {
        // Find two names that hash to the same slot.
        let mut seen = HashMap::new();
        let (first, second) = (0..)
            .map(|i| format!("ns/svc-{i}"))
            .find_map(|n| {
                let slot = fnv1a(&n) % SLOTS;
                seen.insert(slot, n.clone()).map(|prev| (prev, n))
            })
            .expect("a collision");
        let a = allocate([first.as_str(), second.as_str()]);
        assert_ne!(a[first.as_str()], a[second.as_str()]);
        // Whichever order they come in, the outcome is the same.
        assert_eq!(a, allocate([second.as_str(), first.as_str()]));
    }
}
