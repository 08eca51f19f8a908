//! The EC2 instance metadata service (IMDSv2: a session token from
//! `PUT /latest/api/token`, then GETs carrying it). The endpoint comes from
//! `bootstrap.json` or `DDISCO_IMDS` (tests run a per-instance stand-in).

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

#[derive(Clone)]
pub struct Imds {
    base: String,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
}

impl std::fmt::Debug for Imds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Imds").field("base", &self.base).finish()
    }
}

impl Imds {
    pub fn new(base: &str) -> Imds {
        Imds {
            base: base.trim_end_matches('/').to_string(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// The endpoint to use: `DDISCO_IMDS`, else the bootstrap's, else none.
    pub fn from_env_or(bootstrap: Option<&str>) -> Option<Imds> {
        std::env::var("DDISCO_IMDS").ok().filter(|s| !s.is_empty()).as_deref().or(bootstrap).map(Imds::new)
    }

    async fn token(&self) -> Result<String, String> {
        let req = hyper::Request::put(format!("{}/latest/api/token", self.base))
            .header("X-aws-ec2-metadata-token-ttl-seconds", "21600")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let (status, body) = self.call(req).await?;
        if !status.is_success() {
            return Err(format!("IMDS token: HTTP {status}"));
        }
        Ok(body)
    }

    async fn call(&self, req: hyper::Request<Empty<Bytes>>) -> Result<(hyper::StatusCode, String), String> {
        let resp = tokio::time::timeout(Duration::from_secs(3), self.client.request(req))
            .await
            .map_err(|_| format!("IMDS {} timed out", self.base))?
            .map_err(|e| format!("IMDS {}: {e}", self.base))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// `GET /latest/meta-data/<path>`: `Ok(None)` when it does not exist.
    pub async fn get(&self, path: &str) -> Result<Option<String>, String> {
        self.get_under("meta-data", path).await
    }

    /// The instance identity document and AWS's signature of it
    /// (`/latest/dynamic/instance-identity/{document,signature}`).
    pub async fn identity(&self) -> Result<(String, String), String> {
        let doc = self.get_under("dynamic", "instance-identity/document").await?;
        let sig = self.get_under("dynamic", "instance-identity/signature").await?;
        match (doc, sig) {
            (Some(d), Some(s)) => Ok((d, s)),
            _ => Err("instance metadata has no instance identity document".into()),
        }
    }

    async fn get_under(&self, tree: &str, path: &str) -> Result<Option<String>, String> {
        let token = self.token().await?;
        let req = hyper::Request::get(format!("{}/latest/{tree}/{path}", self.base))
            .header("X-aws-ec2-metadata-token", token)
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let (status, body) = self.call(req).await?;
        match status.as_u16() {
            200 => Ok(Some(body)),
            404 => Ok(None),
            s => Err(format!("IMDS {path}: HTTP {s}")),
        }
    }
}
