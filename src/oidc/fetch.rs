//! The HTTP client openidconnect uses for discovery and JWKS: no redirects (an attacker who
//! controls a redirect would pick our keys), a response size cap and a short timeout.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use openidconnect::{HttpRequest, HttpResponse};

const MAX_RESPONSE_BYTES: usize = 512 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request failed: {0}")]
    Request(#[from] reqwest::Error),
    #[error("response larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    #[error("invalid request: {0}")]
    Build(String),
}

pub type FetchFuture = Pin<Box<dyn Future<Output = Result<HttpResponse, FetchError>> + Send>>;

#[derive(Clone)]
pub struct DiscoveryClient {
    client: reqwest::Client,
}

impl DiscoveryClient {
    pub fn new() -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(5))
            .connect_timeout(Duration::from_secs(3))
            .user_agent(concat!("credbroker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client })
    }

    /// A closure in the shape openidconnect's `AsyncHttpClient` accepts.
    pub fn as_openidconnect(&self) -> impl Fn(HttpRequest) -> FetchFuture + '_ {
        move |request| {
            let client = self.client.clone();
            Box::pin(async move { send(client, request).await })
        }
    }
}

async fn send(client: reqwest::Client, request: HttpRequest) -> Result<HttpResponse, FetchError> {
    let (parts, body) = request.into_parts();
    let mut response = client
        .request(parts.method, parts.uri.to_string())
        .headers(parts.headers)
        .body(body)
        .send()
        .await?;
    if response.content_length().is_some_and(|length| length > MAX_RESPONSE_BYTES as u64) {
        return Err(FetchError::TooLarge);
    }
    let mut builder = http::Response::builder().status(response.status());
    for (name, value) in response.headers() {
        builder = builder.header(name, value);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(FetchError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    builder.body(body).map_err(|e| FetchError::Build(e.to_string()))
}
