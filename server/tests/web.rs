//! The web client at `/play`: its three files are served from the binary with the right types,
//! revalidated on every load, and the page loads only from this origin.

mod common;

use anyhow::Result;
use berth_server::app::Server;
use common::*;

#[tokio::test]
async fn the_web_client_is_served_with_the_right_types() -> Result<()> {
    let s = Server::start(config()).await?;
    let base = format!("http://{}", s.addr);
    let http = reqwest::Client::new();
    for (path, content_type, must_contain) in [
        (
            "/play",
            "text/html; charset=utf-8",
            "data-testid=\"screen-signin\"",
        ),
        (
            "/play/",
            "text/html; charset=utf-8",
            "<meta name=\"viewport\"",
        ),
        (
            "/play/app.js",
            "text/javascript; charset=utf-8",
            "/v1/dev/token",
        ),
        ("/play/style.css", "text/css; charset=utf-8", ":root"),
    ] {
        let r = http.get(format!("{base}{path}")).send().await?;
        assert_eq!(r.status(), 200, "{path}");
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(header("content-type"), content_type, "{path}");
        assert_eq!(header("cache-control"), "no-cache", "{path}");
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        if content_type.starts_with("text/html") {
            let csp = header("content-security-policy");
            assert!(csp.contains("script-src 'self'"), "{csp}");
            assert!(csp.contains("connect-src 'self' ws: wss:"), "{csp}");
        }
        let body = r.text().await?;
        assert!(body.contains(must_contain), "{path} lacks {must_contain:?}");
    }

    // The page references its files by absolute path (it is served at `/play`, not `/play/`)
    // and nothing from another origin.
    let html = http
        .get(format!("{base}/play"))
        .send()
        .await?
        .text()
        .await?;
    for want in ["src=\"/play/app.js\"", "href=\"/play/style.css\""] {
        assert!(html.contains(want), "index.html lacks {want}");
    }
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert_eq!(
        http.get(format!("{base}/play/nope.js"))
            .send()
            .await?
            .status(),
        404
    );
    s.shutdown().await;
    Ok(())
}
