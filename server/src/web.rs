//! The reference web client (`assets/web-client/`), served at `/play`: a page for phones and
//! desktops that signs in with a dev token, queues on `/v1/play` and plays through the host
//! gateway. The three files, and the look it shares with `/admin` (`assets/common/base.css`,
//! served at `/assets/base.css`), are compiled into the binary, so the server stays one file to
//! ship.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("../../assets/web-client/index.html");
const APP_JS: &str = include_str!("../../assets/web-client/app.js");
const STYLE_CSS: &str = include_str!("../../assets/web-client/style.css");
const BASE_CSS: &str = include_str!("../../assets/common/base.css");

/// The page talks to this origin (`/v1/dev/token`, `/v1/play`, `/v1/regions`) and to game
/// gateways on any host (`matched.endpoint`, and their latency probes over `http(s)`), loads
/// nothing else and may not be framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self' ws: wss: http: https:; base-uri 'none'; form-action 'self'; \
                   frame-ancestors 'none'";

/// `/play` (and `/play/`), `/play/app.js`, `/play/style.css`, and `/assets/base.css` for both
/// pages.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/play", get(index))
        .route("/play/", get(index))
        .route(
            "/play/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/play/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route(
            "/assets/base.css",
            get(|| async { asset("text/css; charset=utf-8", BASE_CSS) }),
        )
}

async fn index() -> Response {
    page(INDEX_HTML, CSP)
}

/// An HTML page under its content security policy (the `/play` and `/admin` pages).
pub(crate) fn page(html: &'static str, csp: &'static str) -> Response {
    let mut r = asset("text/html; charset=utf-8", html);
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(csp),
    );
    r
}

/// Revalidated on every load (`no-cache`), so a redeployed server never runs a stale page.
pub(crate) fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}
