//! Identity from the cluster: a pod proves its service account to the cluster CA with its
//! projected service-account token, checked by the API server itself (TokenReview), as
//! istiod checks the tokens of its proxies.
//!
//! The token must be issued for the CA's own audience, [`CA_AUDIENCE`] (the pod's
//! projected volume asks for it), so a token meant for another service cannot be replayed
//! here. The review answers which service account the token belongs to. The CA then signs
//! only that account's SPIFFE ID.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

/// The audience of the projected tokens the CA accepts.
pub const CA_AUDIENCE: &str = "isthmus-ca";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// Who a token proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the API server did not accept the token: {0}")]
    Refused(String),
    #[error("the token is not for audience {CA_AUDIENCE}")]
    Audience,
    #[error("the token belongs to {0}, not to a service account")]
    NotServiceAccount(String),
    #[error("cannot reach the API server to review the token: {0}")]
    Api(#[source] kube::Error),
}

/// Checks tokens with the TokenReview API.
#[derive(Clone)]
pub struct TokenReviewer {
    client: kube::Client,
}

impl TokenReviewer {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    /// The service account `token` proves, if the API server says it is valid for
    /// [`CA_AUDIENCE`].
    pub async fn review(&self, token: &str) -> Result<ServiceAccount, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![CA_AUDIENCE.to_owned()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(ReviewError::Api)?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(ReviewError::Refused(
                status.error.unwrap_or_else(|| "not authenticated".into()),
            ));
        }
        if !status.audiences.iter().flatten().any(|a| a == CA_AUDIENCE) {
            return Err(ReviewError::Audience);
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        let account = username
            .strip_prefix(SERVICE_ACCOUNT_PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains(':'));
        match account {
            Some((namespace, name)) => Ok(ServiceAccount {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }),
            None => Err(ReviewError::NotServiceAccount(username)),
        }
    }
}
