//! Checks of the server's web pages (`/play`, `/admin`) as a browser fetches them: each file's
//! type and caching headers, the page's content security policy, and that it loads nothing from
//! another origin.

use anyhow::{ensure, Result};

/// Fetches each `(path, content type, a string its body contains)` from `base` and checks the
/// status, type, `Cache-Control: no-cache` and `nosniff`; an HTML page's content security policy
/// must contain each of `csp`.
pub async fn check_files(base: &str, files: &[(&str, &str, &str)], csp: &[&str]) -> Result<()> {
    let http = reqwest::Client::new();
    for &(path, content_type, must_contain) in files {
        let r = http.get(format!("{base}{path}")).send().await?;
        ensure!(r.status() == 200, "{path}: status {}", r.status());
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        ensure!(header("content-type") == content_type, "{path}: type");
        ensure!(header("cache-control") == "no-cache", "{path}: caching");
        ensure!(header("x-content-type-options") == "nosniff", "{path}");
        if content_type.starts_with("text/html") {
            let policy = header("content-security-policy");
            for want in csp {
                ensure!(policy.contains(want), "{path}: {policy} lacks {want}");
            }
        }
        let body = r.text().await?;
        ensure!(body.contains(must_contain), "{path} lacks {must_contain:?}");
    }
    Ok(())
}

/// The page at `path` references each of `wants` (by absolute path: it is served at `/play`,
/// not `/play/`) and nothing from another origin, and an unknown file under it is 404.
pub async fn check_page_links(base: &str, path: &str, wants: &[&str]) -> Result<()> {
    let http = reqwest::Client::new();
    let html = http
        .get(format!("{base}{path}"))
        .send()
        .await?
        .text()
        .await?;
    for want in wants {
        ensure!(html.contains(want), "{path} lacks {want}");
    }
    ensure!(
        !html.contains("http://") && !html.contains("https://"),
        "{path} loads from another origin"
    );
    let missing = http.get(format!("{base}{path}/nope.js")).send().await?;
    ensure!(
        missing.status() == 404,
        "{path}/nope.js: {}",
        missing.status()
    );
    Ok(())
}
