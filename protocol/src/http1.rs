//! The HTTP/1.1 the game-server SDK speaks on loopback inside a VM, both sides: the agent's
//! server (`berth-guest`) and the Rust client (`berth-sdk`). Small on purpose: under an
//! emulating accelerator a restored clone runs every code path slowly the first time, and
//! the SDK is on the activation path.
//!
//! What it takes: a request line, headers (at most [`MAX_HEAD`] bytes in all), a body by
//! `Content-Length` or `Transfer-Encoding: chunked`, `Expect: 100-continue`, keep-alive
//! (HTTP/1.1 by default, `Connection: close`, HTTP/1.0). What it writes: one buffer per
//! message, always with `Content-Length`.

use std::io::{self, BufRead, Read, Write};

/// The most a request or response head (request line and headers) may take.
pub const MAX_HEAD: usize = 8 * 1024;

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer closed before a message began (a clean end of a keep-alive connection).
    #[error("the connection closed")]
    Closed,
    #[error("the head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the body is larger than {max} bytes")]
    BodyTooLarge { max: usize },
    #[error("{0}")]
    Malformed(String),
}

fn malformed(what: impl Into<String>) -> HttpError {
    HttpError::Malformed(what.into())
}

/// A message's first line and what its headers say about the body and the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The request's method and path, or the response's status code and reason.
    pub first: (String, String),
    pub content_length: Option<usize>,
    pub chunked: bool,
    /// The connection closes after this exchange.
    pub close: bool,
    /// The client waits for `100 Continue` before sending the body.
    pub expect_continue: bool,
}

impl Head {
    /// A request's method.
    pub fn method(&self) -> &str {
        &self.first.0
    }
    /// A request's path, without its query.
    pub fn path(&self) -> &str {
        self.first.1.split('?').next().unwrap_or_default()
    }
    /// A response's status code.
    pub fn status(&self) -> u16 {
        self.first.0.parse().unwrap_or(0)
    }
}

/// Reads one line of a head, counting it against `budget`.
fn head_line<R: BufRead>(r: &mut R, budget: &mut usize) -> Result<String, HttpError> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(*budget as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n > *budget {
        return Err(HttpError::HeadTooLarge);
    }
    *budget -= n;
    if line.last() != Some(&b'\n') {
        return Err(if n == 0 {
            HttpError::Closed
        } else {
            malformed("the connection closed inside the head")
        });
    }
    let text = String::from_utf8(line).map_err(|_| malformed("the head is not UTF-8"))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// Reads a request's or response's head. [`HttpError::Closed`] when the peer closed first.
pub fn read_head<R: BufRead>(r: &mut R, request: bool) -> Result<Head, HttpError> {
    let mut budget = MAX_HEAD;
    let mut first = head_line(r, &mut budget)?;
    // Tolerate blank lines before a request (RFC 9112 §2.2).
    while request && first.is_empty() {
        first = head_line(r, &mut budget)?;
    }
    let mut parts = first.splitn(3, ' ');
    let (a, b, c) = (parts.next(), parts.next(), parts.next());
    let (first, version) = match (request, a, b, c) {
        (true, Some(m), Some(p), Some(v)) if !m.is_empty() && p.starts_with('/') => {
            ((m.to_owned(), p.to_owned()), v)
        }
        (false, Some(v), Some(code), reason) if code.len() == 3 => {
            ((code.to_owned(), reason.unwrap_or_default().to_owned()), v)
        }
        _ => return Err(malformed(format!("not an HTTP/1 first line: {first:?}"))),
    };
    let mut head = Head {
        first,
        content_length: None,
        chunked: false,
        close: match version {
            "HTTP/1.1" => false,
            "HTTP/1.0" => true,
            other => return Err(malformed(format!("unsupported version {other:?}"))),
        },
        expect_continue: false,
    };
    loop {
        let line = head_line(r, &mut budget)?;
        if line.is_empty() {
            return Ok(head);
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| malformed(format!("not a header: {line:?}")))?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                let n = value
                    .parse()
                    .map_err(|_| malformed(format!("bad Content-Length {value:?}")))?;
                head.content_length = Some(n);
            }
            "transfer-encoding" => head.chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" if value.eq_ignore_ascii_case("close") => head.close = true,
            "connection" if value.eq_ignore_ascii_case("keep-alive") => head.close = false,
            "expect" => head.expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
}

/// Reads the body `head` announces, at most `max` bytes.
pub fn read_body<R: BufRead>(r: &mut R, head: &Head, max: usize) -> Result<Vec<u8>, HttpError> {
    if head.chunked {
        return read_chunked(r, max);
    }
    let n = head.content_length.unwrap_or(0);
    if n > max {
        return Err(HttpError::BodyTooLarge { max });
    }
    let mut body = vec![0; n];
    r.read_exact(&mut body)?;
    Ok(body)
}

fn read_chunked<R: BufRead>(r: &mut R, max: usize) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let mut budget = MAX_HEAD;
        let line = head_line(r, &mut budget)?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| malformed(format!("bad chunk size {size:?}")))?;
        if size == 0 {
            // Trailers, then the empty line.
            while !head_line(r, &mut budget)?.is_empty() {}
            return Ok(body);
        }
        if body.len() + size > max {
            return Err(HttpError::BodyTooLarge { max });
        }
        let at = body.len();
        body.resize(at + size, 0);
        r.read_exact(&mut body[at..])?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(malformed("a chunk does not end with CRLF"));
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Other",
    }
}

/// Writes `100 Continue` (to a client that waits for it before its body).
pub fn write_continue<W: Write>(w: &mut W) -> io::Result<()> {
    w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    w.flush()
}

/// Writes a JSON response in one write.
pub fn write_response<W: Write>(
    w: &mut W,
    status: u16,
    body: &[u8],
    close: bool,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
        reason(status),
        body.len(),
        if close { "Connection: close\r\n" } else { "" },
    )
    .into_bytes();
    out.extend_from_slice(body);
    w.write_all(&out)?;
    w.flush()
}

/// Writes a request with an optional JSON body in one write.
pub fn write_request<W: Write>(
    w: &mut W,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> io::Result<()> {
    let body = body.unwrap_or_default();
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: berth-sdk\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    w.write_all(&out)?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    fn request(text: &str) -> Result<(Head, Vec<u8>), HttpError> {
        let mut r = BufReader::new(text.as_bytes());
        let head = read_head(&mut r, true)?;
        let body = read_body(&mut r, &head, 64)?;
        Ok((head, body))
    }

    #[test]
    fn requests_are_read_with_their_bodies() {
        let (h, b) = request("POST /v1/ready?x=1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            .expect("a request");
        assert_eq!(
            (h.method(), h.path(), h.close),
            ("POST", "/v1/ready", false)
        );
        assert_eq!(b, b"{}");
        let (h, b) = request(
            "POST /v1/ended HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .expect("chunked");
        assert!(h.chunked);
        assert_eq!(b, b"abcde");
        let (h, _) = request("GET /v1/session HTTP/1.0\r\n\r\n").expect("1.0");
        assert!(h.close, "HTTP/1.0 closes by default");
        let (h, _) =
            request("\r\nGET / HTTP/1.1\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
                .expect("expect");
        assert!(h.expect_continue && h.close);
    }

    #[test]
    fn bad_messages_are_errors_not_panics() {
        for bad in [
            "GARBAGE\r\n\r\n",
            "GET nopath HTTP/1.1\r\n\r\n",
            "GET / HTTP/2\r\n\r\n",
            "GET / HTTP/1.1\r\nno colon\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "GET / HTTP/1.1\r\nHost: a",
        ] {
            assert!(
                matches!(request(bad), Err(HttpError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(request(""), Err(HttpError::Closed)));
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert!(matches!(request(&long), Err(HttpError::HeadTooLarge)));
        assert!(matches!(
            request("POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n"),
            Err(HttpError::BodyTooLarge { max: 64 })
        ));
        assert!(matches!(
            request("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n41\r\n"),
            Err(HttpError::BodyTooLarge { max: 64 })
        ));
    }

    #[test]
    fn what_is_written_reads_back() {
        let mut out = Vec::new();
        write_request(&mut out, "POST", "/v1/ended", Some(b"{\"a\":1}")).expect("write");
        let (h, b) = request(std::str::from_utf8(&out).expect("utf-8")).expect("read");
        assert_eq!((h.method(), b.as_slice()), ("POST", &b"{\"a\":1}"[..]));
        let mut out = Vec::new();
        write_response(&mut out, 409, b"{}", true).expect("write");
        let mut r = BufReader::new(out.as_slice());
        let h = read_head(&mut r, false).expect("head");
        assert_eq!((h.status(), h.close), (409, true));
        assert_eq!(read_body(&mut r, &h, 10).expect("body"), b"{}");
    }
}
