use super::*;

/// Every kind of field, set: what the controller encodes, the sidecar gets back.
fn everything() -> ServiceRouting {
    let dest = |service: &str, subset: Option<&str>, weight| Destination {
        service: service.into(),
        subset: subset.map(Into::into),
        port: Some(9080),
        weight,
    };
    let policy = TrafficPolicy {
        load_balancer: Some(LoadBalancer::ConsistentHash(HashOn::Cookie {
            name: "user".into(),
            path: Some("/".into()),
            ttl_secs: 60,
        })),
        outlier: Some(OutlierDetection {
            consecutive_5xx: Some(3),
            consecutive_gateway: None,
            base_ejection_ms: 30_000,
            max_ejection_percent: 50,
            min_health_percent: 10,
        }),
        connection_pool: Some(ConnectionPool {
            max_requests: Some(10),
            max_pending: Some(1),
            max_retries: None,
            connect_timeout_ms: Some(250),
            max_requests_per_connection: Some(100),
            idle_timeout_ms: Some(5_000),
        }),
        locality: Some(LocalityLb {
            enabled: true,
            failover: vec![("us-east".into(), "us-west".into())],
            distribute: vec![(
                "us-east/*".into(),
                vec![("us-east/zone-a/*".into(), 80), ("us-west/*".into(), 20)],
            )],
            failover_priority: vec!["topology.kubernetes.io/region".into()],
        }),
        tls: Some(ClientTls {
            mode: TlsMode::Mutual,
            client_certificate: "/etc/certs/client.pem".into(),
            private_key: "/etc/certs/key.pem".into(),
            ca_certificates: "/etc/certs/ca.pem".into(),
            subject_alt_names: vec!["api.example.com".into()],
            sni: "api.example.com".into(),
            insecure_skip_verify: false,
        }),
        ports: vec![(
            9080,
            TrafficPolicy {
                load_balancer: Some(LoadBalancer::LeastRequest),
                ..Default::default()
            },
        )],
    };
    ServiceRouting {
        http: vec![
            HttpRoute {
                name: "jason".into(),
                matches: vec![RouteMatch {
                    uri: Some(StringMatch::Prefix("/api".into())),
                    method: Some(StringMatch::Exact("GET".into())),
                    authority: Some(StringMatch::Regex("re.*".into())),
                    headers: [("end-user".to_string(), StringMatch::Exact("jason".into()))].into(),
                    query_params: [("v".to_string(), StringMatch::Prefix("2".into()))].into(),
                    without_headers: [("x".to_string(), StringMatch::Exact("y".into()))].into(),
                    ignore_uri_case: true,
                    port: Some(80),
                    source_labels: [("app".to_string(), "web".to_string())].into(),
                }],
                action: RouteAction::Route(vec![
                    dest("demo/reviews", Some("v2"), 80),
                    dest("demo/reviews", None, 20),
                ]),
                rewrite: Some(Rewrite {
                    uri: Some("/v2".into()),
                    authority: None,
                }),
                timeout_ms: Some(1500),
                retries: Some(Retries {
                    attempts: 3,
                    per_try_timeout_ms: Some(500),
                    retry_on: vec!["5xx".into(), "unavailable".into()],
                }),
                fault: Some(Fault {
                    delay: Some((7000, 100.0)),
                    abort: Some((Abort::Grpc(14), 12.5)),
                }),
                headers: HeaderOps {
                    request: HeaderOp {
                        set: [("a".to_string(), "b".to_string())].into(),
                        add: BTreeMap::new(),
                        remove: vec!["c".into()],
                    },
                    response: HeaderOp::default(),
                },
                mirror: Some(Mirror {
                    destination: dest("demo/mirror", None, 100),
                    percentage: 50.0,
                }),
            },
            HttpRoute {
                name: String::new(),
                matches: vec![],
                action: RouteAction::Redirect {
                    uri: Some("/new".into()),
                    authority: None,
                    code: 302,
                },
                rewrite: None,
                timeout_ms: None,
                retries: None,
                fault: None,
                headers: HeaderOps::default(),
                mirror: None,
            },
            HttpRoute {
                name: String::new(),
                matches: vec![],
                action: RouteAction::DirectResponse {
                    status: 418,
                    body: "teapot".into(),
                },
                rewrite: None,
                timeout_ms: None,
                retries: None,
                fault: Some(Fault {
                    delay: None,
                    abort: Some((Abort::Http(503), 100.0)),
                }),
                headers: HeaderOps::default(),
                mirror: None,
            },
        ],
        subsets: vec![Subset {
            name: "v2".into(),
            labels: [("version".to_string(), "v2".to_string())].into(),
            policy: TrafficPolicy {
                load_balancer: Some(LoadBalancer::ConsistentHash(HashOn::SourceIp)),
                ..Default::default()
            },
        }],
        policy,
        rate_limits: vec![RateLimit {
            route: Some("jason".into()),
            tokens: 10,
            interval_ms: 1000,
            burst: 5,
            per_caller: true,
        }],
        global_rate_limits: vec![crate::routing::GlobalRateLimit {
            name: "shared".into(),
            route: None,
            requests_per_second: 300,
        }],
        health_check: Some(crate::routing::HealthCheck {
            name: "hc".into(),
            port: Some(80),
            probe: crate::routing::Probe::Http {
                path: "/healthz".into(),
                host: None,
                expected_statuses: vec![(200, 299)],
            },
            interval_ms: 1000,
            timeout_ms: 500,
            jitter_ms: 100,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }),
        tcp: vec![TcpRoute {
            ports: vec![7000],
            destinations: vec![dest("demo/tcp", None, 100)],
        }],
        virtual_service_scope: None,
        destination_rule_scope: None,
    }
}

#[test]
fn routing_survives_the_wire_unchanged() {
    let r = everything();
    let wire = pb::ServiceRouting::from(&r);
    let bytes = prost::Message::encode_to_vec(&wire);
    let back: pb::ServiceRouting = prost::Message::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(ServiceRouting::try_from(back), Ok(r));
    let empty = ServiceRouting::default();
    assert_eq!(
        ServiceRouting::try_from(pb::ServiceRouting::from(&empty)),
        Ok(empty)
    );
}

#[test]
fn out_of_range_fields_are_refused_by_name() {
    let refuse = |f: &dyn Fn(&mut pb::ServiceRouting), field: &str| {
        let mut wire = pb::ServiceRouting::from(&everything());
        f(&mut wire);
        let e = ServiceRouting::try_from(wire).expect_err(field);
        assert!(e.field.starts_with(field), "{e} is not about {field}");
    };
    use pb::http_route::Action;
    refuse(
        &|w| w.http[0].matches[0].port = Some(70_000),
        "http[0].matches[0].port",
    );
    refuse(
        &|w| {
            if let Some(Action::Route(d)) = &mut w.http[0].action {
                d.destinations[0].service = "no-namespace".into();
            }
        },
        "http[0].route[0].service",
    );
    refuse(
        &|w| {
            w.http[1].action = Some(Action::Redirect(pb::Redirect {
                code: 200,
                ..Default::default()
            }))
        },
        "http[1].redirect.code",
    );
    refuse(&|w| w.http[0].action = None, "http[0].action");
    refuse(
        &|w| {
            if let Some(f) = &mut w.http[0].fault {
                if let Some(d) = &mut f.delay {
                    d.percentage = f64::NAN;
                }
            }
        },
        "http[0].fault.delay.percentage",
    );
    refuse(
        &|w| {
            if let Some(f) = &mut w.http[0].fault {
                f.abort = Some(pb::FaultAbort {
                    status: Some(pb::fault_abort::Status::Grpc(99)),
                    percentage: 1.0,
                });
            }
        },
        "http[0].fault.abort.grpc",
    );
    refuse(
        &|w| {
            if let Some(p) = &mut w.policy {
                let nested = p.clone();
                p.ports[0].policy = Some(nested);
            }
        },
        "policy.ports[0].policy.ports",
    );
    refuse(
        &|w| {
            if let Some(p) = &mut w.policy {
                p.load_balancer = Some(pb::LoadBalancer {
                    kind: Some(pb::load_balancer::Kind::Simple(42)),
                });
            }
        },
        "policy.load_balancer",
    );
    refuse(&|w| w.rate_limits[0].tokens = 0, "rate_limits[0]");
}
