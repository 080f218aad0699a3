//! The cluster CA's gRPC face: signs workload certificates for exactly the identity the
//! caller proved, by token (first issue) or by its current certificate (renewal). A token
//! is a bootstrap token (`ist1.`), or on Kubernetes a projected service-account token,
//! which the API server checks (TokenReview).

use std::sync::Arc;
use std::time::Duration;

use isthmus_core::identity::SpiffeId;
use isthmus_core::token::TokenKey;
use isthmus_proto::ca::certificate_authority_server::CertificateAuthority as CaApi;
use isthmus_proto::ca::{CertificateRequest, CertificateResponse};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tonic::{Request, Response, Status};

use crate::trust::{token_audience, ClusterState};
use crate::Config;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone)]
pub struct CaService {
    trust: crate::trust::Trust,
    token_key: Arc<TokenKey>,
    trust_domain: String,
    audience: String,
    ttl: Duration,
    requests: Family<Outcome, Counter>,
    /// Checks Kubernetes service-account tokens; `None` off Kubernetes.
    reviewer: Option<isthmus_kubernetes::identity::TokenReviewer>,
}

impl CaService {
    pub fn new(
        config: &Config,
        state: &ClusterState,
        reviewer: Option<isthmus_kubernetes::identity::TokenReviewer>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            reviewer,
            trust: state.trust.clone(),
            token_key: state.token_key.clone(),
            trust_domain: state.trust_domain.clone(),
            audience: token_audience(&config.cluster),
            ttl: config.workload_cert_ttl,
            requests: Family::default(),
        })
    }

    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "certificate_requests",
            "certificate requests by outcome",
            self.requests.clone(),
        );
    }

    /// The identity the caller proved: its verified certificate, else its token.
    async fn proved<T>(&self, req: &Request<T>) -> Result<SpiffeId, Status> {
        if let Some(id) = isthmus_core::grpc::peer_of(req).and_then(|p| p.identity.clone()) {
            return Ok(id);
        }
        let token = isthmus_core::grpc::bearer_token(req)
            .ok_or_else(|| Status::unauthenticated("present a token or a workload certificate"))?;
        if !isthmus_core::token::is_bootstrap(token) {
            let Some(reviewer) = &self.reviewer else {
                return Err(Status::unauthenticated(
                    "not a bootstrap token, and this cluster's CA reads no Kubernetes tokens",
                ));
            };
            let account = reviewer.review(token).await.map_err(|e| {
                Status::unauthenticated(format!("service-account token refused: {e}"))
            })?;
            return Ok(SpiffeId::new(
                &self.trust_domain,
                &account.namespace,
                &account.name,
            ));
        }
        let subject = self
            .token_key
            .verify(token, &self.audience)
            .map_err(|e| Status::unauthenticated(format!("bootstrap token refused: {e}")))?;
        let (ns, sa) = subject.split_once('/').ok_or_else(|| {
            Status::unauthenticated("bootstrap token names no namespace/service-account")
        })?;
        Ok(SpiffeId::new(&self.trust_domain, ns, sa))
    }
}

#[tonic::async_trait]
impl CaApi for CaService {
    async fn create_certificate(
        &self,
        req: Request<CertificateRequest>,
    ) -> Result<Response<CertificateResponse>, Status> {
        let proved = match self.proved(&req).await {
            Ok(id) => id,
            Err(s) => {
                self.requests
                    .get_or_create(&Outcome {
                        outcome: "unauthenticated",
                    })
                    .inc();
                return Err(s);
            }
        };
        let issuing = self.trust.current();
        match issuing
            .ca
            .sign_leaf(&req.get_ref().csr_pem, &proved, self.ttl)
        {
            Ok(chain) => {
                self.requests
                    .get_or_create(&Outcome { outcome: "issued" })
                    .inc();
                tracing::debug!(id = %proved, "workload certificate issued");
                Ok(Response::new(CertificateResponse {
                    cert_chain_pem: chain,
                    trust_bundle_pem: issuing.bundle_pem.clone(),
                }))
            }
            Err(e) => {
                self.requests
                    .get_or_create(&Outcome { outcome: "refused" })
                    .inc();
                tracing::warn!(id = %proved, error = %e, "certificate request refused");
                Err(Status::permission_denied(e.to_string()))
            }
        }
    }
}
