//! Who may call the service, and who a caller is: the bearer token, the origin of browser
//! requests, and the client address that per-client limits count against.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use actix_web::body::BoxBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::{AUTHORIZATION, HOST, ORIGIN};
use actix_web::middleware::Next;
use actix_web::{HttpRequest, HttpResponse, web};

use super::assets::PAGE_ASSETS;
use super::error_response;
use streamdet_actors::ErrorCode;

/// Who may call: the bearer token (empty: anyone) and the foreign origins allowed.
pub struct Access {
    pub token: String,
    pub origins: Vec<String>,
}

fn access(req: &ServiceRequest) -> Option<&Access> {
    req.app_data::<web::Data<Access>>().map(|data| data.get_ref())
}

/// Middleware: every route but `/health`, `/openapi.json` and the page's own files (which carry
/// no secret; the page's API calls need the token like any other) requires the token.
pub async fn require_token(req: ServiceRequest, next: Next<BoxBody>) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let token = access(&req).map_or("", |a| a.token.as_str());
    let public = matches!(req.path(), "/health" | "/ready" | "/openapi.json") || PAGE_ASSETS.iter().any(|(path, _, _)| *path == req.path());
    let allowed =
        token.is_empty() || public || req.method() == Method::OPTIONS || bearer_matches(req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()), token);
    if allowed { next.call(req).await } else { Ok(req.into_response(error_response(ErrorCode::Unauthorized, "this server requires a bearer token"))) }
}

/// Middleware: a request from a foreign origin (see [`origin_allowed`]) gets 403.
pub async fn require_known_origin(req: ServiceRequest, next: Next<BoxBody>) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let allowed = origin_allowed(req.request(), access(&req).map_or(&[], |a| a.origins.as_slice()));
    if allowed { next.call(req).await } else { Ok(req.into_response(forbidden_origin())) }
}

/// Whether `Authorization` carries `token` (the scheme `Bearer` in any case, RFC 7235).
pub fn bearer_matches(header: Option<&str>, token: &str) -> bool {
    let Some((scheme, given)) = header.and_then(|h| h.trim().split_once(' ')) else { return false };
    scheme.eq_ignore_ascii_case("bearer") && same_secret(given.trim().as_bytes(), token.as_bytes())
}

/// Compares a secret in time that depends on the expected length only, so response times do
/// not tell an attacker how many leading bytes were right.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut difference = u8::from(given.len() != expected.len());
    for (i, want) in expected.iter().enumerate() {
        let got = given.get(i).copied().unwrap_or(!want);
        difference |= std::hint::black_box(got ^ want);
    }
    difference == 0
}

/// Whether a request may do anything here as far as its origin goes: requests without
/// `Origin` (curl, servers) and the page's own requests (the origin names the `Host` it was sent
/// to) may; a page of another site may only when its origin is listed in `cors_origins`.
/// Preflights are left to the CORS layer.
pub fn origin_allowed(req: &HttpRequest, allowed: &[String]) -> bool {
    if req.method() == Method::OPTIONS {
        return true;
    }
    let Some(origin) = req.headers().get(ORIGIN) else { return true };
    let Ok(origin) = origin.to_str() else { return false };
    if allowed.iter().any(|a| a == origin) {
        return true;
    }
    let host = req.headers().get(HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

fn forbidden_origin() -> HttpResponse {
    error_response(ErrorCode::Forbidden, "requests from this origin are not allowed (see server.cors_origins)")
}

/// The client a request comes from: the peer address, or, when the peer is a trusted proxy,
/// the address its `X-Forwarded-For` names (the rightmost one that is not a trusted proxy).
pub fn client_address(req: &HttpRequest, trusted_proxies: &[IpAddr]) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip();
    if !trusted_proxies.contains(&peer) {
        return Some(peer);
    }
    let forwarded = req.headers().get_all("x-forwarded-for").filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','));
    let hops: Vec<IpAddr> = forwarded.filter_map(|hop| hop.trim().parse().ok()).collect();
    Some(hops.into_iter().rev().find(|hop| !trusted_proxies.contains(hop)).unwrap_or(peer))
}

/// Uploads running per client address.
#[derive(Default, Clone)]
pub struct ClientCounts(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One upload of one client, counted until dropped.
pub struct ClientSlot {
    counts: ClientCounts,
    client: IpAddr,
}

impl ClientCounts {
    /// A slot for `client` unless it already runs `max` uploads.
    pub fn acquire(&self, client: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(client).or_insert(0);
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(ClientSlot { counts: self.clone(), client })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_exact() {
        for header in ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret "] {
            assert!(bearer_matches(Some(header), "s3cret"), "{header}");
        }
        for header in ["Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret", ""] {
            assert!(!bearer_matches(Some(header), "s3cret"), "{header}");
        }
        assert!(!bearer_matches(None, "s3cret"));
    }

    #[test]
    fn foreign_origins_are_refused_and_own_or_listed_ones_pass() {
        let allowed = vec!["https://app.example".to_string()];
        let req = |origin: Option<&str>| {
            let mut r = TestRequest::post().insert_header((HOST, "127.0.0.1:8080"));
            if let Some(o) = origin {
                r = r.insert_header((ORIGIN, o));
            }
            r.to_http_request()
        };
        assert!(origin_allowed(&req(None), &allowed), "curl sends no Origin");
        assert!(origin_allowed(&req(Some("http://127.0.0.1:8080")), &allowed), "the page itself");
        assert!(origin_allowed(&req(Some("https://app.example")), &allowed));
        for foreign in ["https://evil.example", "null", "http://127.0.0.1:8081", "http://127.0.0.1:8080.evil.example"] {
            assert!(!origin_allowed(&req(Some(foreign)), &allowed), "{foreign}");
        }
    }

    #[test]
    fn forwarded_addresses_count_only_behind_trusted_proxies() {
        let peer: std::net::SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let req = TestRequest::default().peer_addr(peer).insert_header(("X-Forwarded-For", "203.0.113.9, 198.51.100.7")).to_http_request();
        assert_eq!(client_address(&req, &[]), Some(peer.ip()), "no proxy is trusted by default");
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(client_address(&req, &[proxy]), "198.51.100.7".parse().ok(), "the hop the proxy saw");
        let counts = ClientCounts::default();
        let a = counts.acquire(proxy, 1).expect("a first slot");
        assert!(counts.acquire(proxy, 1).is_none());
        drop(a);
        assert!(counts.acquire(proxy, 1).is_some());
    }
}
