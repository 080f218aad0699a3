//! Active health checks: the HealthChecks of the services this sidecar's app serves, run
//! against the app, their verdicts reported to the controller with the app's own health.
//!
//! The endpoint's own sidecar probes, not each caller: one probe per endpoint and interval
//! however many sidecars call it (Envoy's per-caller checks grow with callers × endpoints),
//! over the pod's own network, and the controller takes a failing endpoint out for every
//! proxy of the cluster and, through its export, for every other cluster (whose gateways
//! then reach only endpoints that pass). A caller's own view of the path to an endpoint is
//! passive health's part (outlier detection in `lb.rs`).
//!
//! A check starts pending (reported as nothing, which counts as passing): its first success
//! makes it pass, `unhealthy_threshold` failures in a row make it fail; a failing check
//! passes again after `healthy_threshold` successes in a row. Probes run every interval
//! plus up to the jitter, the first one at once (after the jitter), each bounded by the
//! timeout.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use isthmus_core::routing::{HealthCheck, Probe};
use isthmus_proto::discovery::{CheckResult, HealthReport};
use isthmus_proto::health::health_check_response::ServingStatus;
use isthmus_proto::health::health_client::HealthClient;
use isthmus_proto::health::HealthCheckRequest;
use tokio::sync::watch;

use crate::metrics::{CheckLabels, Metrics, ServiceLabels};
use crate::state::MeshState;

/// What the sidecar's health report says of one HealthCheck.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// No verdict yet: not reported, and so passing.
    #[default]
    Pending,
    Passing,
    Failing,
}

/// Probes in a row, and the verdict they add up to.
#[derive(Debug, Default)]
struct Tally {
    verdict: Verdict,
    successes: u32,
    failures: u32,
}

impl Tally {
    /// Counts one probe; returns the new verdict when it changed.
    fn observe(&mut self, passed: bool, check: &HealthCheck) -> Option<Verdict> {
        if passed {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        let next = match self.verdict {
            Verdict::Pending if passed => Verdict::Passing,
            Verdict::Failing if self.successes >= check.healthy_threshold => Verdict::Passing,
            Verdict::Pending | Verdict::Passing if self.failures >= check.unhealthy_threshold => {
                Verdict::Failing
            }
            v => v,
        };
        (next != self.verdict).then(|| {
            self.verdict = next;
            next
        })
    }
}

/// One check to run: the service (`namespace/name`), the app's address and the Host an
/// HTTP probe sends.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Job {
    check: HealthCheck,
    target: SocketAddr,
    host: String,
}

/// Runs the checks the pushed config gives this workload's services (started, changed and
/// stopped as it changes) and keeps `report.checks` to their verdicts. `app` is the app's
/// address (its IP is probed).
pub async fn run(
    mut state: watch::Receiver<Arc<MeshState>>,
    workload: String,
    app: SocketAddr,
    metrics: Arc<Metrics>,
    report: watch::Sender<HealthReport>,
) {
    let mut running: BTreeMap<String, (Job, tokio::task::JoinHandle<()>)> = BTreeMap::new();
    loop {
        let wanted = jobs(&state.borrow_and_update(), &workload, app);
        running.retain(|service, (job, task)| {
            let keep = wanted.get(service) == Some(job);
            if !keep {
                task.abort();
                forget(&report, &metrics, service);
            }
            keep
        });
        for (service, job) in wanted {
            if running.contains_key(&service) {
                continue;
            }
            tracing::info!(%service, check = %job.check.name, target = %job.target, "health check started");
            let task = tokio::spawn(probe_forever(
                service.clone(),
                job.clone(),
                metrics.clone(),
                report.clone(),
            ));
            running.insert(service, (job, task));
        }
        if state.changed().await.is_err() {
            break;
        }
    }
    for (_, (_, task)) in running {
        task.abort();
    }
}

/// The checks of the services `workload` is an endpoint of, by service.
fn jobs(state: &MeshState, workload: &str, app: SocketAddr) -> BTreeMap<String, Job> {
    let mut jobs = BTreeMap::new();
    for svc in state.services.values() {
        let Some(check) = svc.routing.as_ref().and_then(|r| r.health_check.as_ref()) else {
            continue;
        };
        if !svc.workloads.iter().any(|w| w == workload) {
            continue;
        }
        let port = match check.port {
            Some(p) => svc.ports.iter().find(|x| x.port == p),
            None => svc.ports.first(),
        };
        let Some(port) = port else { continue };
        let host = match &check.probe {
            Probe::Http {
                host: Some(host), ..
            } => host.clone(),
            _ => svc.host.to_string(),
        };
        jobs.insert(
            format!("{}/{}", svc.namespace, svc.name),
            Job {
                check: check.clone(),
                target: SocketAddr::new(app.ip(), port.target_port),
                host,
            },
        );
    }
    jobs
}

/// Takes a stopped check's verdict out of the report and its gauge out of the metrics.
fn forget(report: &watch::Sender<HealthReport>, metrics: &Metrics, service: &str) {
    report.send_if_modified(|r| {
        let before = r.checks.len();
        r.checks.retain(|c| c.service != service);
        r.checks.len() != before
    });
    metrics.health_check_passing.remove(&ServiceLabels {
        service: service.to_owned(),
    });
}

async fn probe_forever(
    service: String,
    job: Job,
    metrics: Arc<Metrics>,
    report: watch::Sender<HealthReport>,
) {
    let check = &job.check;
    let timeout = Duration::from_millis(check.timeout_ms);
    let mut tally = Tally::default();
    let mut wait = jitter(check.jitter_ms);
    loop {
        tokio::time::sleep(wait).await;
        wait = Duration::from_millis(check.interval_ms) + jitter(check.jitter_ms);
        let outcome = match tokio::time::timeout(timeout, probe(&job)).await {
            Ok(o) => o,
            Err(_) => Err(format!("no answer in {} ms", check.timeout_ms)),
        };
        let result = match &outcome {
            Ok(_) => "success",
            Err(e) if e.starts_with("no answer in") => "timeout",
            Err(_) => "failure",
        };
        metrics
            .health_checks
            .get_or_create(&CheckLabels {
                service: service.clone(),
                result,
            })
            .inc();
        let Some(verdict) = tally.observe(outcome.is_ok(), check) else {
            continue;
        };
        let passing = verdict == Verdict::Passing;
        let detail = match outcome {
            Ok(seen) | Err(seen) => seen,
        };
        if passing {
            tracing::info!(%service, %detail, "health check passes");
        } else {
            tracing::warn!(%service, %detail, failures = tally.failures, "health check fails");
        }
        metrics
            .health_check_passing
            .get_or_create(&ServiceLabels {
                service: service.clone(),
            })
            .set(i64::from(passing));
        report.send_modify(|r| {
            r.checks.retain(|c| c.service != service);
            r.checks.push(CheckResult {
                service: service.clone(),
                healthy: passing,
                detail: detail.clone(),
            });
            r.checks.sort_by(|a, b| a.service.cmp(&b.service));
        });
    }
}

fn jitter(max_ms: u64) -> Duration {
    Duration::from_millis(if max_ms == 0 {
        0
    } else {
        rand::random_range(0..=max_ms)
    })
}

/// One probe: what it saw, as `Ok` when that passes.
async fn probe(job: &Job) -> Result<String, String> {
    match &job.check.probe {
        Probe::Tcp => tokio::net::TcpStream::connect(job.target)
            .await
            .map(|_| format!("TCP connect to {}", job.target))
            .map_err(|e| format!("TCP connect to {}: {e}", job.target)),
        Probe::Http {
            path,
            expected_statuses,
            ..
        } => {
            let status = http_get(job.target, &job.host, path).await?;
            let seen = format!("HTTP {status} from GET {path}");
            let ranges: &[(u16, u16)] = if expected_statuses.is_empty() {
                &[HealthCheck::DEFAULT_STATUSES]
            } else {
                expected_statuses
            };
            if ranges.iter().any(|(a, b)| (*a..=*b).contains(&status)) {
                Ok(seen)
            } else {
                Err(seen)
            }
        }
        Probe::Grpc { service } => grpc_check(job.target, service).await,
    }
}

async fn http_get(target: SocketAddr, host: &str, path: &str) -> Result<u16, String> {
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, "isthmus-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let (resp, _conn) = crate::app::send_once(target, req).await?;
    Ok(resp.status().as_u16())
}

async fn grpc_check(target: SocketAddr, service: &str) -> Result<String, String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect to {target}: {e}"))?;
    let asked = if service.is_empty() {
        "the server".to_owned()
    } else {
        format!("`{service}`")
    };
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|s| {
            format!(
                "grpc.health.v1 Check of {asked}: {:?}: {}",
                s.code(),
                s.message()
            )
        })?;
    let status = answer.into_inner().status();
    let seen = format!("grpc.health.v1 says {asked} is {}", status.as_str_name());
    if status == ServingStatus::Serving {
        Ok(seen)
    } else {
        Err(seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;

    fn check(healthy: u32, unhealthy: u32) -> HealthCheck {
        HealthCheck {
            name: "hc".into(),
            port: None,
            probe: Probe::Tcp,
            interval_ms: 1000,
            timeout_ms: 100,
            jitter_ms: 0,
            healthy_threshold: healthy,
            unhealthy_threshold: unhealthy,
        }
    }

    #[test]
    fn thresholds_decide_when_a_check_fails_and_passes_again() {
        let c = check(2, 3);
        let mut t = Tally::default();
        assert_eq!(
            t.observe(false, &c),
            None,
            "pending: one failure is not enough"
        );
        assert_eq!(t.observe(false, &c), None);
        assert_eq!(
            t.observe(false, &c),
            Some(Verdict::Failing),
            "three in a row"
        );
        assert_eq!(
            t.observe(true, &c),
            None,
            "one success is not enough to come back"
        );
        assert_eq!(t.observe(false, &c), None, "and a failure starts over");
        assert_eq!(t.observe(true, &c), None);
        assert_eq!(t.observe(true, &c), Some(Verdict::Passing), "two in a row");
        assert_eq!(t.observe(false, &c), None);
        assert_eq!(t.observe(true, &c), None, "a success resets the failures");
        assert_eq!(t.observe(false, &c), None);
        assert_eq!(t.observe(false, &c), None);
        assert_eq!(t.observe(false, &c), Some(Verdict::Failing));
    }

    #[test]
    fn a_first_success_passes_at_once() {
        let mut t = Tally::default();
        assert_eq!(t.observe(true, &check(5, 5)), Some(Verdict::Passing));
    }

    async fn serve_http(status: u16) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| async move {
                            let host = req.headers().get("host").cloned();
                            let mut resp =
                                http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                            // Only the expected Host passes: the probe must send it.
                            *resp.status_mut() = if host
                                .as_ref()
                                .is_some_and(|h| h == "echo.demo.svc.cluster.local")
                            {
                                http::StatusCode::from_u16(status).expect("status")
                            } else {
                                http::StatusCode::MISDIRECTED_REQUEST
                            };
                            Ok::<_, std::convert::Infallible>(resp)
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        addr
    }

    fn http_job(target: SocketAddr, expected: Vec<(u16, u16)>) -> Job {
        Job {
            check: HealthCheck {
                probe: Probe::Http {
                    path: "/healthz".into(),
                    host: None,
                    expected_statuses: expected,
                },
                ..check(1, 1)
            },
            target,
            host: "echo.demo.svc.cluster.local".into(),
        }
    }

    #[tokio::test]
    async fn http_probes_pass_on_the_expected_statuses_only() {
        let ok = serve_http(204).await;
        assert_eq!(
            probe(&http_job(ok, vec![])).await,
            Ok("HTTP 204 from GET /healthz".into())
        );
        assert_eq!(
            probe(&http_job(ok, vec![(200, 200)])).await,
            Err("HTTP 204 from GET /healthz".into())
        );
        let failing = serve_http(503).await;
        assert_eq!(
            probe(&http_job(failing, vec![])).await,
            Err("HTTP 503 from GET /healthz".into())
        );
        let nothing = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let refused = probe(&http_job(nothing, vec![]))
            .await
            .expect_err("refused");
        assert!(refused.contains("connect to"), "{refused}");
    }

    #[tokio::test]
    async fn tcp_probes_pass_when_a_connection_comes_up() {
        let tcp_job = |target| Job {
            check: check(1, 1),
            target,
            host: String::new(),
        };
        let up = serve_http(200).await;
        assert!(probe(&tcp_job(up)).await.is_ok());
        let nothing = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        assert!(probe(&tcp_job(nothing)).await.is_err());
    }
}
