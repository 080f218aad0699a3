//! Global rate limits: one budget per limit for the service's sidecars in every cluster,
//! split between clusters by their demand. Nothing central is on the request path: each
//! sidecar enforces its part of its cluster's share with a local token bucket.
//!
//! The split, for a budget `N` over the `k` clusters whose sidecars enforce the limit:
//! - each cluster keeps a floor of `FLOOR · N / k`, so demand that appears somewhere is
//!   served at once while shares move;
//! - the rest is shared max-min fairly on demand plus `HEADROOM` (a cluster that wants
//!   less than an equal part gets what it wants; the others split what is left);
//! - what nobody wants is spread equally.
//!
//! The shares always add up to `N`. A new split is published only when some cluster's
//! share moves by more than `HYSTERESIS · N`, so a steady load does not push config every
//! second. The budget is the smallest any cluster's config sets (clusters should agree, as
//! the Multi-Cluster Services API's sameness asks; the strictest wins when they do not).

use std::collections::BTreeMap;

use isthmus_proto::federation::{LimitDemand, LimitShares};

/// Part of the budget split equally before demand counts.
pub const FLOOR: f64 = 0.1;
/// Demand is asked for with this much more, so a growing load is not capped at once.
pub const HEADROOM: f64 = 1.1;
/// A split is published again only when a share moves by more than this part of the budget.
pub const HYSTERESIS: f64 = 0.05;

/// Splits `budget` between the clusters of `demand` (cluster → requests per second).
pub fn split(budget: f64, demand: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    if demand.is_empty() {
        return BTreeMap::new();
    }
    let k = demand.len() as f64;
    let floor = budget * FLOOR / k;
    let mut remaining = budget - floor * k;
    let mut wants: Vec<(&String, f64)> = demand
        .iter()
        .map(|(c, d)| (c, (d * HEADROOM - floor).max(0.0)))
        .collect();
    wants.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut shares = BTreeMap::new();
    let n = wants.len();
    for (i, (cluster, want)) in wants.into_iter().enumerate() {
        let fair = remaining / (n - i) as f64;
        let given = want.min(fair);
        remaining -= given;
        shares.insert(cluster.clone(), floor + given);
    }
    let spread = remaining / k;
    for s in shares.values_mut() {
        *s += spread;
    }
    shares
}

/// Each limit's split from every cluster's report (cluster → key → budget and demand).
pub fn shares(
    reports: &BTreeMap<String, BTreeMap<String, LimitDemand>>,
) -> BTreeMap<String, LimitShares> {
    let mut by_key: BTreeMap<&String, (u32, BTreeMap<String, f64>)> = BTreeMap::new();
    for (cluster, limits) in reports {
        for (key, d) in limits {
            let entry = by_key.entry(key).or_insert((d.budget_rps, BTreeMap::new()));
            entry.0 = entry.0.min(d.budget_rps);
            entry.1.insert(cluster.clone(), d.demand_rps.max(0.0));
        }
    }
    by_key
        .into_iter()
        .map(|(key, (budget, demand))| {
            (
                key.clone(),
                LimitShares {
                    by_cluster: split(f64::from(budget), &demand),
                },
            )
        })
        .collect()
}

/// Whether `next` differs enough from `published` to be sent: a limit or a cluster came or
/// went, or a share moved by more than `HYSTERESIS` of its budget.
pub fn moved(
    published: &BTreeMap<String, LimitShares>,
    next: &BTreeMap<String, LimitShares>,
) -> bool {
    if published.len() != next.len() {
        return true;
    }
    next.iter().any(|(key, n)| {
        let Some(p) = published.get(key) else {
            return true;
        };
        let budget: f64 = n.by_cluster.values().sum();
        p.by_cluster.len() != n.by_cluster.len()
            || n.by_cluster.iter().any(|(c, share)| {
                p.by_cluster
                    .get(c)
                    .is_none_or(|old| (old - share).abs() > HYSTERESIS * budget)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demand(d: &[(&str, f64)]) -> BTreeMap<String, f64> {
        d.iter().map(|(c, r)| (c.to_string(), *r)).collect()
    }

    #[test]
    fn shares_add_up_to_the_budget_and_follow_demand() {
        let s = split(
            30.0,
            &demand(&[("east", 40.0), ("west", 10.0), ("north", 0.0)]),
        );
        assert!((s.values().sum::<f64>() - 30.0).abs() < 1e-9, "{s:?}");
        // North keeps its floor; west gets what it asks; east the rest.
        assert!((s["north"] - 1.0).abs() < 1e-9, "{s:?}");
        assert!((s["west"] - 11.0).abs() < 1e-9, "{s:?}");
        assert!((s["east"] - 18.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn unwanted_budget_is_spread_and_no_demand_splits_equally() {
        let s = split(100.0, &demand(&[("a", 10.0), ("b", 20.0)]));
        assert!((s.values().sum::<f64>() - 100.0).abs() < 1e-9);
        assert!(s["a"] >= 11.0 && s["b"] >= 22.0, "{s:?}");
        let s = split(90.0, &demand(&[("a", 0.0), ("b", 0.0), ("c", 0.0)]));
        assert!(s.values().all(|v| (v - 30.0).abs() < 1e-9), "{s:?}");
    }

    #[test]
    fn the_strictest_budget_wins_and_small_moves_are_not_published() {
        let report = |budget, rps| {
            BTreeMap::from([(
                "demo/svc/g".to_string(),
                LimitDemand {
                    budget_rps: budget,
                    demand_rps: rps,
                },
            )])
        };
        let reports = BTreeMap::from([
            ("east".to_string(), report(100, 50.0)),
            ("west".to_string(), report(60, 50.0)),
        ]);
        let s = shares(&reports);
        let total: f64 = s["demo/svc/g"].by_cluster.values().sum();
        assert!((total - 60.0).abs() < 1e-9);
        let published = s.clone();
        let reports2 = BTreeMap::from([
            ("east".to_string(), report(100, 51.0)),
            ("west".to_string(), report(60, 49.0)),
        ]);
        assert!(!moved(&published, &shares(&reports2)));
        let reports3 = BTreeMap::from([
            ("east".to_string(), report(100, 90.0)),
            ("west".to_string(), report(60, 10.0)),
        ]);
        assert!(moved(&published, &shares(&reports3)));
    }
}
