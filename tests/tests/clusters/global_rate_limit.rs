//! A GlobalRateLimit: one budget for a service's sidecars in three clusters, split by the
//! federation from the demand each cluster's sidecars see, under uneven load that then
//! moves. The mesh must hold within the published bound (README, "Global rate limits"):
//! over a window of T seconds at most N·(T + 1) requests pass, and the limit must not
//! starve a cluster that has demand.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isthmus::client::AppClient;
use isthmus_tests::{config_dump, eventually, Mesh};

const HOST: &str = "echo.demo.svc.cluster.local";
/// The budget for the whole mesh, requests per second.
const BUDGET: f64 = 20.0;

fn limit_yaml() -> String {
    format!("apiVersion: isthmus.io/v1alpha1\nkind: GlobalRateLimit\nmetadata: {{name: echo-budget, namespace: demo}}\nspec:\n  targetRef: {{kind: Service, name: echo}}\n  requestsPerSecond: {BUDGET}\n")
}

/// Answers as they come: (when, status, answering cluster).
type Log = Arc<Mutex<Vec<(Instant, u16, String)>>>;

/// Sends requests from `outbound` at `rate` per second (open loop: one every 1/rate s,
/// whatever the answers take) until `rate` is set to 0.
fn load(outbound: SocketAddr, rate: Arc<Mutex<f64>>, log: Log) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = AppClient::new();
        loop {
            let r = *rate.lock().expect("rate");
            if r <= 0.0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let (client, log) = (client.clone(), log.clone());
            tokio::spawn(async move {
                let (status, cluster) = match client.get(outbound, HOST, "/").await {
                    Ok(resp) => (
                        resp.status.as_u16(),
                        resp.answer().map(|a| a.cluster).unwrap_or_default(),
                    ),
                    Err(_) => (0, String::new()),
                };
                log.lock()
                    .expect("log")
                    .push((Instant::now(), status, cluster));
            });
            tokio::time::sleep(Duration::from_secs_f64(1.0 / r)).await;
        }
    })
}

/// What one client's requests met in a window.
#[derive(Debug, Default)]
struct Seen {
    /// Requests answered in the window, passed or not.
    offered: usize,
    /// Those that passed, by answering cluster.
    passed: std::collections::BTreeMap<String, usize>,
    /// Statuses other than 200 and 429.
    odd: Vec<u16>,
}

impl Seen {
    fn passed(&self) -> usize {
        self.passed.values().sum()
    }
}

/// What the requests of `log` answered in `[from, to)` met.
fn seen(log: &Log, from: Instant, to: Instant) -> Seen {
    let mut s = Seen::default();
    for (at, status, cluster) in log.lock().expect("log").iter() {
        if *at < from || *at >= to {
            continue;
        }
        s.offered += 1;
        match status {
            200 => *s.passed.entry(cluster.clone()).or_default() += 1,
            429 => {}
            other => s.odd.push(*other),
        }
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_rate_limit_holds_its_bound_across_clusters_under_uneven_moving_load(
) -> anyhow::Result<()> {
    let mut mesh = Mesh::start(&["east", "west", "north"]).await?;
    for c in ["east", "west", "north"] {
        mesh.add_workload(c, &format!("echo-{c}"), Some("echo"), "echo")
            .await?;
        mesh.apply(c, "echo-budget.yaml", &limit_yaml()).await?;
    }
    mesh.add_workload("east", "client-east", None, "frontend")
        .await?;
    mesh.add_workload("west", "client-west", None, "frontend")
        .await?;
    let (east, west) = (
        mesh.workload("east", "client-east").outbound(),
        mesh.workload("west", "client-west").outbound(),
    );
    isthmus_tests::reachable(east, HOST).await?;
    isthmus_tests::reachable(west, HOST).await?;

    // Uneven load: 28 req/s in east, 6 in west, none in north; 34 offered for 20.
    let (east_rate, west_rate) = (Arc::new(Mutex::new(28.0)), Arc::new(Mutex::new(6.0)));
    let (east_log, west_log): (Log, Log) = Default::default();
    let tasks = [
        load(east, east_rate.clone(), east_log.clone()),
        load(west, west_rate.clone(), west_log.clone()),
    ];
    // The federation splits the budget by demand: east most, north its floor.
    let fed = mesh.federation.as_ref().expect("federation").admin_address;
    let key = "demo/echo/echo-budget";
    eventually(
        "shares to follow demand",
        Duration::from_secs(15),
        || async {
            let dump = config_dump(fed).await?;
            let s = &dump["global_rate_limits"][key];
            let share = |c: &str| s[c]["share_rps"].as_f64().unwrap_or(0.0);
            anyhow::ensure!(
                share("east") > share("west") + 2.0 && share("west") > share("north"),
                "{s}"
            );
            Ok(())
        },
    )
    .await?;
    // East's controller shows what it reported: its budget and its sidecars' demand.
    let east_report = &config_dump(mesh.controller_admin("east")).await?["global_rate_limits"][key];
    assert_eq!(east_report["budget_rps"], 20, "{east_report}");
    assert!(
        east_report["demand_rps"].as_f64().unwrap_or(0.0) > 10.0,
        "{east_report}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let window = Duration::from_secs(8);
    let from = Instant::now();
    tokio::time::sleep(window + Duration::from_secs(2)).await;
    let (e, w) = (
        seen(&east_log, from, from + window),
        seen(&west_log, from, from + window),
    );
    let total = e.passed() + w.passed();
    let t = window.as_secs_f64();
    eprintln!("steady: {total} passed in {window:?} (budget {BUDGET}/s): east {e:?}, west {w:?}");
    assert!(e.odd.is_empty() && w.odd.is_empty(), "only 200 and 429");
    assert!(
        (total as f64) <= BUDGET * (t + 1.0),
        "{total} passed in {t} s: over the bound {}",
        BUDGET * (t + 1.0)
    );
    // Nothing starves: what was offered passes up to the budget, west's small demand whole.
    let offered = (e.offered + w.offered) as f64;
    assert!(
        total as f64 >= 0.8 * offered.min(BUDGET * t),
        "{total} passed of {offered} offered in {t} s: the limit starves demand"
    );
    assert!(
        w.passed() as f64 >= 0.9 * w.offered as f64,
        "west's demand fits its share: {w:?}"
    );

    // The load moves: east drops to 6, west climbs to 28. Shares follow.
    *east_rate.lock().expect("rate") = 6.0;
    *west_rate.lock().expect("rate") = 28.0;
    let moved = Instant::now();
    eventually("shares to move west", Duration::from_secs(15), || async {
        let dump = config_dump(fed).await?;
        let s = &dump["global_rate_limits"][key];
        let share = |c: &str| s[c]["share_rps"].as_f64().unwrap_or(0.0);
        anyhow::ensure!(share("west") > share("east") + 2.0, "{s}");
        Ok(())
    })
    .await?;
    let settled = moved.elapsed();
    // Through the move and after: the bound holds over the whole window.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let to = Instant::now() - Duration::from_secs(1);
    let (e, w) = (seen(&east_log, moved, to), seen(&west_log, moved, to));
    let total = e.passed() + w.passed();
    let t = (to - moved).as_secs_f64();
    eprintln!(
        "moving: {total} passed in {t:.1} s, shares moved in {settled:?}: east {e:?}, west {w:?}"
    );
    assert!(e.odd.is_empty() && w.odd.is_empty(), "only 200 and 429");
    assert!(
        (total as f64) <= BUDGET * (t + 1.0),
        "{total} passed in {t} s while shares moved: over the bound {}",
        BUDGET * (t + 1.0)
    );
    for t in tasks {
        t.abort();
    }
    Ok(())
}
