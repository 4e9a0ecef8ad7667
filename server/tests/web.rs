//! The web client at `/play`: its three files are served from the binary with the right types,
//! revalidated on every load, and the page loads only from this origin.

mod common;

use anyhow::Result;
use berth_server::app::Server;
use berth_testkit::pages;
use common::*;

#[tokio::test]
async fn the_web_client_is_served_with_the_right_types() -> Result<()> {
    let s = Server::start(config()).await?;
    let base = format!("http://{}", s.addr);
    pages::check_files(
        &base,
        &[
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
            ("/play/style.css", "text/css; charset=utf-8", ".screen"),
            ("/assets/base.css", "text/css; charset=utf-8", ":root"),
        ],
        &["script-src 'self'", "connect-src 'self' ws: wss:"],
    )
    .await?;
    let links = [
        "src=\"/play/app.js\"",
        "href=\"/play/style.css\"",
        "href=\"/assets/base.css\"",
    ];
    pages::check_page_links(&base, "/play", &links).await?;
    s.shutdown().await;
    Ok(())
}
