//! Substrates shipped between hosts instead of primed on each: the books both sides keep,
//! the wire format, and the fetching side. The serving side's HTTP route is in
//! [`crate::peer`]; the pool docks what arrives (`pool/fetch.rs`).
//!
//! **Who may fetch what.** Nothing new is shared between hosts: the server brokers every
//! fetch over the host links it already authenticates. A host lacking a substrate asks
//! ([`Ship::ask`] → `want_substrate` on its link, with its expected fingerprint's key); the
//! server picks a peer with that substrate docked, gives the peer a one-time grant
//! (`share_substrate` → [`Ship::grant`]) and the asker the peer's address and the same grant
//! (`fetch_substrate` → [`Ship::answer`]); `no_substrate`, or no answer within `[peer]
//! ask_ms`, and the asker primes. A grant lets one fetch of one image in within its ttl
//! ([`Ship::redeem`]). The asker trusts nothing it receives: the header must match its own
//! expected fingerprint before anything else is read, and the state checksum and RAM digest are
//! checked by [`Substrate::open`] before the substrate is docked.
//!
//! **The stream** (`GET /v1/substrates/{image}`, `authorization: Bearer <grant>`), all integers
//! big-endian:
//! ```text
//! stream = "BERTHSUB" u32:version(1) file* 'E'
//! file   = 'F' u8:name_len name u64:size chunk*        (chunks until `size` bytes)
//! chunk  = 'D' u32:len bytes | 'Z' u32:len             (len ≤ 1 MiB; 'Z': that many zeros)
//! files  = substrate.json (≤ 64 KiB), state (header's state_bytes), ram (≤ guest memory; only
//!          when the header has a RAM digest), in that order
//! ```
//! Zero runs travel as `Z` chunks, so a sparse RAM file stays sparse on both sides. The disk
//! overlay and kernel header are not shipped: the receiver derives them from its own copy of
//! the image ([`crate::driver::VmDriver::localise`]), so no host's paths travel.
//!
//! **Bounds.** Memory: one chunk (1 MiB) and a short queue of them, never a whole file. Sizes:
//! as above, anything larger is refused (`ship_too_big`). Time: `[peer] fetch_timeout_s` for
//! the whole fetch. Files go into a temp folder (`substrates/.incoming-<image>`, one owner:
//! [`Incoming`], removed on drop) and are renamed into place only after every check passed;
//! a fetch happens only for an image with no docked substrate, so it never replaces a good one.

use crate::substrate::{Fingerprint, Header, Substrate, SubstrateError};
use axum::body::Bytes;
use berth_protocol::host::HostMessage;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

pub const STREAM_MAGIC: &[u8; 8] = b"BERTHSUB";
pub const STREAM_VERSION: u32 = 1;
/// The largest chunk either side sends or accepts.
pub const CHUNK: usize = 1 << 20;
/// The largest `substrate.json` accepted.
pub const MAX_HEADER: u64 = 64 << 10;
/// The files a substrate ships as, in stream order (`ram` only with a RAM digest).
pub const SHIPPED: [&str; 3] = ["substrate.json", "state", "ram"];
/// How long a fetch whose grant the peer does not know yet is tried again: the peer hears of
/// the grant through the server, maybe a moment after the asker.
const GRANT_LAG: Duration = Duration::from_secs(2);

/// The server's answer to [`Ship::ask`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    Fetch {
        from: String,
        grant: String,
    },
    /// Prime it: no peer has it (`reason` as the server said, or `no_answer`).
    Prime {
        reason: String,
    },
}

struct Want {
    fingerprint: String,
    sent: bool,
    reply: Option<oneshot::Sender<Offer>>,
}

struct Grant {
    image: String,
    expires: Instant,
    used: bool,
}

#[derive(Default)]
struct Books {
    wants: HashMap<String, Want>,
    grants: HashMap<String, Grant>,
}

/// The shipping books of one host: what it asks for (as a fetcher) and the grants it holds
/// (as a peer). Cheap to clone; the pool owns it, the link and the peer listener use it.
#[derive(Clone, Default)]
pub struct Ship {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    books: Mutex<Books>,
    wanted: Notify,
    url: OnceLock<String>,
}

impl std::fmt::Debug for Ship {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ship").field("url", &self.url()).finish()
    }
}

/// Why a peer refused a fetch (the answer of `GET /v1/substrates/{image}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("a bearer grant is required")]
    GrantRequired,
    #[error("this host holds no such grant")]
    UnknownGrant,
    #[error("this grant was used already")]
    GrantUsed,
    #[error("this grant has expired")]
    GrantExpired,
    #[error("this grant is for another image")]
    GrantMismatch,
    #[error("no docked substrate of {0} here")]
    NoSubstrate(String),
    #[error("the substrate cannot be read")]
    Io,
}

impl PeerError {
    pub fn code(&self) -> &'static str {
        match self {
            PeerError::GrantRequired => "grant_required",
            PeerError::UnknownGrant => "unknown_grant",
            PeerError::GrantUsed => "grant_used",
            PeerError::GrantExpired => "grant_expired",
            PeerError::GrantMismatch => "grant_mismatch",
            PeerError::NoSubstrate(_) => "no_substrate",
            PeerError::Io => "substrate_io",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            PeerError::GrantRequired | PeerError::UnknownGrant => 401,
            PeerError::GrantUsed | PeerError::GrantExpired | PeerError::GrantMismatch => 403,
            PeerError::NoSubstrate(_) => 404,
            PeerError::Io => 500,
        }
    }
}

/// Why a fetched substrate was refused (the host then primes).
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("the peer refused: HTTP {status} {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the peer could not be reached")]
    Unreachable(#[source] reqwest::Error),
    #[error("the fetch timed out")]
    Timeout,
    #[error("the stream ended early")]
    Truncated,
    #[error("bad substrate stream: {0}")]
    BadStream(String),
    #[error("the stream's {0} is larger than allowed")]
    TooBig(&'static str),
    #[error(transparent)]
    Substrate(#[from] SubstrateError),
    #[error("writing the fetched substrate")]
    Io(#[source] std::io::Error),
    #[error("making the host's own files for it")]
    Localise(#[source] crate::driver::DriverError),
    #[error("hostd is shutting down")]
    ShuttingDown,
}

impl ShipError {
    /// A short stable label for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ShipError::Refused { .. } => "ship_refused",
            ShipError::Unreachable(_) => "ship_unreachable",
            ShipError::Timeout => "ship_timeout",
            ShipError::Truncated => "ship_truncated",
            ShipError::BadStream(_) => "ship_bad_stream",
            ShipError::TooBig(_) => "ship_too_big",
            ShipError::Substrate(e) => e.code(),
            ShipError::Io(_) => "ship_io",
            ShipError::Localise(_) => "ship_localise",
            ShipError::ShuttingDown => "shutting_down",
        }
    }
}

impl Ship {
    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.inner.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the URL peers fetch from (once the listener is bound).
    pub fn set_url(&self, url: String) {
        let _ = self.inner.url.set(url);
    }

    /// Where this host serves substrates to peers; `None` when it serves none.
    pub fn url(&self) -> Option<String> {
        self.inner.url.get().cloned()
    }

    /// Asks the server (through the link) for a peer's substrate of `image` with this
    /// fingerprint key, waiting at most `wait` for the answer.
    pub async fn ask(&self, image: &str, fingerprint: String, wait: Duration) -> Offer {
        let (reply, answer) = oneshot::channel();
        self.books().wants.insert(
            image.to_owned(),
            Want {
                fingerprint,
                sent: false,
                reply: Some(reply),
            },
        );
        self.inner.wanted.notify_one();
        let offer = match tokio::time::timeout(wait, answer).await {
            Ok(Ok(offer)) => offer,
            _ => Offer::Prime {
                reason: "no_answer".into(),
            },
        };
        self.books().wants.remove(image);
        offer
    }

    /// Resolves when there may be wants to send ([`Ship::take_unsent`]).
    pub async fn wanted(&self) {
        self.inner.wanted.notified().await
    }

    /// The `want_substrate` messages not sent on this connection yet, marked sent.
    pub fn take_unsent(&self) -> Vec<HostMessage> {
        let mut books = self.books();
        books
            .wants
            .iter_mut()
            .filter(|(_, w)| !w.sent && w.reply.is_some())
            .map(|(image, w)| {
                w.sent = true;
                HostMessage::WantSubstrate {
                    image: image.clone(),
                    fingerprint: w.fingerprint.clone(),
                }
            })
            .collect()
    }

    /// A new connection: every open want is sent again (the old one may have lost them).
    pub fn resend(&self) {
        for w in self.books().wants.values_mut() {
            w.sent = false;
        }
        self.inner.wanted.notify_one();
    }

    /// The server's answer to a want (ignored when nobody waits for one any more).
    pub fn answer(&self, image: &str, offer: Offer) {
        let reply = self
            .books()
            .wants
            .get_mut(image)
            .and_then(|w| w.reply.take());
        match reply {
            Some(reply) => {
                let _ = reply.send(offer);
            }
            None => tracing::debug!(image, "an answer to a want nobody waits for"),
        }
    }

    /// Lets one fetch of `image` with `grant` in within `ttl` (from `share_substrate`).
    pub fn grant(&self, image: String, grant: String, ttl: Duration) {
        let now = Instant::now();
        let mut books = self.books();
        // Expired grants are forgotten here, so the table stays as small as the live ones.
        books.grants.retain(|_, g| g.expires > now);
        books.grants.insert(
            grant,
            Grant {
                image,
                expires: now + ttl.min(Duration::from_secs(600)),
                used: false,
            },
        );
    }

    /// Takes `grant` for one fetch of `image`: known, unused, unexpired and for this image.
    pub fn redeem(&self, grant: &str, image: &str) -> Result<(), PeerError> {
        let mut books = self.books();
        let g = books.grants.get_mut(grant).ok_or(PeerError::UnknownGrant)?;
        if g.used {
            return Err(PeerError::GrantUsed);
        }
        if g.expires <= Instant::now() {
            return Err(PeerError::GrantExpired);
        }
        if g.image != image {
            return Err(PeerError::GrantMismatch);
        }
        g.used = true;
        Ok(())
    }
}

/// A fetched substrate's temp folder, `substrates/.incoming-<image>`: removed on drop unless
/// [`Incoming::commit`] renamed it into place. (A crashed hostd's is removed at the next start
/// with the other folders that are no configured image.)
#[derive(Debug)]
pub struct Incoming {
    dir: PathBuf,
    committed: bool,
}

impl Incoming {
    pub fn new(substrates: &Path, image: &str) -> Result<Incoming, ShipError> {
        let dir = substrates.join(format!(".incoming-{image}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(ShipError::Io)?;
        Ok(Incoming {
            dir,
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Renames the folder to `to` (which must not hold a docked substrate).
    pub fn commit(mut self, to: &Path) -> Result<(), ShipError> {
        let _ = std::fs::remove_dir_all(to);
        std::fs::rename(&self.dir, to).map_err(ShipError::Io)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Fetches `image` from the peer at `from` with `grant` into `into`, checking the header
/// against `expected` before the files are read; returns the bytes received. The folder then
/// holds the shipped files, not yet checked for content ([`Substrate::open`] does that).
pub async fn fetch(
    from: &str,
    grant: &str,
    image: &str,
    expected: &Fingerprint,
    into: &Path,
    timeout: Duration,
) -> Result<u64, ShipError> {
    let work = async {
        let response = request(from, grant, image, timeout).await?;
        let mut reader = Reader::new(response);
        decode(&mut reader, expected, into).await?;
        Ok(reader.wire)
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ShipError::Timeout)?
}

/// The peer's answer to the fetch, once it is 200; a grant the peer does not know yet is
/// asked again for [`GRANT_LAG`].
async fn request(
    from: &str,
    grant: &str,
    image: &str,
    timeout: Duration,
) -> Result<reqwest::Response, ShipError> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .build()
        .map_err(ShipError::Unreachable)?;
    let url = format!("{}/v1/substrates/{image}", from.trim_end_matches('/'));
    let since = Instant::now();
    loop {
        let response = client
            .get(&url)
            .bearer_auth(grant)
            .send()
            .await
            .map_err(ShipError::Unreachable)?;
        let status = response.status().as_u16();
        if status == 200 {
            return Ok(response);
        }
        let body: berth_protocol::api::ErrorBody = response
            .json()
            .await
            .unwrap_or_else(|_| berth_protocol::api::ErrorBody::new("unknown", "no error body"));
        let code = body.code.as_str().to_owned();
        if code == PeerError::UnknownGrant.code() && since.elapsed() < GRANT_LAG {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        return Err(ShipError::Refused {
            status,
            code,
            message: body.message,
        });
    }
}

/// Where the stream's bytes come from: the peer's response, or bytes in a test.
pub(crate) trait Chunks {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, ShipError>;
}

impl Chunks for reqwest::Response {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, ShipError> {
        self.chunk().await.map_err(|e| {
            if e.is_timeout() {
                ShipError::Timeout
            } else if e.is_body() || e.is_decode() {
                ShipError::Truncated
            } else {
                ShipError::Unreachable(e)
            }
        })
    }
}

impl Chunks for std::collections::VecDeque<Bytes> {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, ShipError> {
        Ok(self.pop_front())
    }
}

/// Reads the stream a few bytes or a chunk at a time, holding at most about two chunks.
pub(crate) struct Reader<C> {
    source: C,
    buf: Vec<u8>,
    at: usize,
    /// Bytes received so far.
    pub wire: u64,
}

impl<C: Chunks> Reader<C> {
    pub(crate) fn new(source: C) -> Self {
        Reader {
            source,
            buf: Vec::new(),
            at: 0,
            wire: 0,
        }
    }

    async fn take(&mut self, n: usize) -> Result<&[u8], ShipError> {
        while self.buf.len() - self.at < n {
            let Some(more) = self.source.next_chunk().await? else {
                return Err(ShipError::Truncated);
            };
            self.wire += more.len() as u64;
            self.buf.drain(..self.at);
            self.at = 0;
            self.buf.extend_from_slice(&more);
        }
        let bytes = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(bytes)
    }

    async fn u8(&mut self) -> Result<u8, ShipError> {
        Ok(self.take(1).await?[0])
    }

    async fn u32(&mut self) -> Result<u32, ShipError> {
        let b = self.take(4).await?;
        Ok(u32::from_be_bytes(b.try_into().expect("4 bytes")))
    }

    async fn u64(&mut self) -> Result<u64, ShipError> {
        let b = self.take(8).await?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }

    /// The next file's name (which must be `name`) and size.
    async fn file(&mut self, name: &str) -> Result<u64, ShipError> {
        if self.u8().await? != b'F' {
            return Err(ShipError::BadStream(format!("expected the file {name}")));
        }
        let len = self.u8().await? as usize;
        if self.take(len).await? != name.as_bytes() {
            return Err(ShipError::BadStream(format!("expected the file {name}")));
        }
        self.u64().await
    }

    /// The next chunk of a file with `left` bytes to go: `Some(bytes)`, or `None` and its
    /// length for a run of zeros.
    async fn chunk(&mut self, left: u64) -> Result<(Option<&[u8]>, usize), ShipError> {
        let tag = self.u8().await?;
        let len = self.u32().await? as usize;
        if len == 0 || len > CHUNK || len as u64 > left {
            return Err(ShipError::BadStream(format!("a chunk of {len} bytes")));
        }
        match tag {
            b'D' => Ok((Some(self.take(len).await?), len)),
            b'Z' => Ok((None, len)),
            _ => Err(ShipError::BadStream("bad chunk tag".into())),
        }
    }
}

/// Reads a whole stream into `dir`, refusing it at the first thing that does not fit.
pub(crate) async fn decode<C: Chunks>(
    r: &mut Reader<C>,
    expected: &Fingerprint,
    dir: &Path,
) -> Result<(), ShipError> {
    if r.take(8).await? != STREAM_MAGIC {
        return Err(ShipError::BadStream("not a substrate stream".into()));
    }
    let version = r.u32().await?;
    if version != STREAM_VERSION {
        return Err(ShipError::BadStream(format!("stream version {version}")));
    }
    let size = r.file(SHIPPED[0]).await?;
    if size > MAX_HEADER {
        return Err(ShipError::TooBig("header"));
    }
    let mut header_bytes = Vec::with_capacity(size as usize);
    while (header_bytes.len() as u64) < size {
        let left = size - header_bytes.len() as u64;
        match r.chunk(left).await? {
            (Some(bytes), _) => header_bytes.extend_from_slice(bytes),
            (None, len) => header_bytes.resize(header_bytes.len() + len, 0),
        }
    }
    // The header first, against what this host expects: a mismatch reads nothing more.
    let header = Header::parse(dir, &header_bytes, expected)?;
    write_all(&Substrate::header_path(dir), &header_bytes).await?;
    let size = r.file(SHIPPED[1]).await?;
    if size != header.state_bytes {
        return Err(ShipError::BadStream(
            "state size differs from its header".into(),
        ));
    }
    receive(r, &Substrate::state_path(dir), size).await?;
    if header.ram_digest.is_some() {
        let size = r.file(SHIPPED[2]).await?;
        if size > u64::from(expected.machine.memory_mib) << 20 {
            return Err(ShipError::TooBig("RAM file"));
        }
        receive(r, &Substrate::ram_path(dir), size).await?;
    }
    if r.u8().await? != b'E' {
        return Err(ShipError::BadStream("no end after the last file".into()));
    }
    Ok(())
}

async fn write_all(path: &Path, bytes: &[u8]) -> Result<(), ShipError> {
    tokio::fs::write(path, bytes).await.map_err(ShipError::Io)
}

/// Receives one file of `size` bytes into `path`, its zero runs left as holes.
async fn receive<C: Chunks>(r: &mut Reader<C>, path: &Path, size: u64) -> Result<(), ShipError> {
    let mut file = tokio::fs::File::create(path).await.map_err(ShipError::Io)?;
    let mut done = 0u64;
    while done < size {
        match r.chunk(size - done).await? {
            (Some(bytes), len) => {
                file.write_all(bytes).await.map_err(ShipError::Io)?;
                done += len as u64;
            }
            (None, len) => {
                file.seek(std::io::SeekFrom::Current(len as i64))
                    .await
                    .map_err(ShipError::Io)?;
                done += len as u64;
            }
        }
    }
    file.set_len(size).await.map_err(ShipError::Io)?;
    file.flush().await.map_err(ShipError::Io)
}

/// Writes `substrate`'s shipped files as one stream into `out`, a chunk at a time (run off the
/// async runtime: it reads files). Stops quietly when the receiving side is gone.
pub fn encode(
    files: Vec<(&'static str, std::fs::File, u64)>,
    out: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    use std::io::Read;
    let send = |bytes: Vec<u8>| out.blocking_send(Ok(Bytes::from(bytes))).is_ok();
    let mut head = STREAM_MAGIC.to_vec();
    head.extend_from_slice(&STREAM_VERSION.to_be_bytes());
    if !send(head) {
        return;
    }
    let mut buf = vec![0u8; CHUNK];
    for (name, mut file, size) in files {
        let mut rec = vec![b'F', name.len() as u8];
        rec.extend_from_slice(name.as_bytes());
        rec.extend_from_slice(&size.to_be_bytes());
        if !send(rec) {
            return;
        }
        let mut left = size;
        while left > 0 {
            let want = (left as usize).min(CHUNK);
            if let Err(e) = file.read_exact(&mut buf[..want]) {
                let _ = out.blocking_send(Err(e));
                return;
            }
            let zeros = buf[..want].iter().all(|&b| b == 0);
            let mut rec = Vec::with_capacity(5 + if zeros { 0 } else { want });
            rec.push(if zeros { b'Z' } else { b'D' });
            rec.extend_from_slice(&(want as u32).to_be_bytes());
            if !zeros {
                rec.extend_from_slice(&buf[..want]);
            }
            if !send(rec) {
                return;
            }
            left -= want as u64;
        }
    }
    send(vec![b'E']);
}

/// Opens the files of `substrate` that ship, with their sizes (open first: a substrate
/// discarded meanwhile is still read whole from its open files).
pub fn shipped_files(
    substrate: &Substrate,
) -> std::io::Result<Vec<(&'static str, std::fs::File, u64)>> {
    let mut paths = vec![
        (SHIPPED[0], Substrate::header_path(&substrate.dir)),
        (SHIPPED[1], substrate.state()),
    ];
    if substrate.header.ram_digest.is_some() {
        paths.push((SHIPPED[2], substrate.ram()));
    }
    paths
        .into_iter()
        .map(|(name, path)| {
            let file = std::fs::File::open(path)?;
            let size = file.metadata()?.len();
            Ok((name, file, size))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::substrate::tests::{fp, write};
    use std::collections::VecDeque;

    /// The stream `encode` makes of the substrate in `dir`.
    fn stream_of(dir: &Path) -> Vec<u8> {
        let bytes = std::fs::read(Substrate::header_path(dir)).expect("header");
        let header: Header = serde_json::from_slice(&bytes).expect("json");
        let s = Substrate {
            dir: dir.to_owned(),
            header,
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let files = shipped_files(&s).expect("open");
        // `encode` blocks on its queue: off the runtime, as the peer runs it.
        std::thread::spawn(move || encode(files, &tx))
            .join()
            .expect("encodes");
        let mut out = Vec::new();
        while let Ok(Ok(b)) = rx.try_recv() {
            out.extend_from_slice(&b);
        }
        out
    }

    async fn decode_bytes(bytes: &[u8], into: &Path) -> Result<(), ShipError> {
        // Split at odd places, as a network would.
        let chunks: VecDeque<Bytes> = bytes.chunks(7_777).map(Bytes::copy_from_slice).collect();
        decode(&mut Reader::new(chunks), &fp(), into).await
    }

    #[tokio::test]
    async fn a_stream_round_trips_into_an_openable_substrate_with_its_holes() {
        let src = tempfile::tempdir().expect("tmp");
        write(src.path(), fp(), b"state");
        let bytes = stream_of(src.path());
        // 3 MiB of RAM with non-zero content travel as data; the stream is no bigger.
        assert!(bytes.len() < (3 << 20) + 4096, "{}", bytes.len());
        let dst = tempfile::tempdir().expect("tmp");
        decode_bytes(&bytes, dst.path()).await.expect("decodes");
        Substrate::open(dst.path(), &fp()).expect("opens with its digests");
    }

    #[tokio::test]
    async fn a_truncated_or_garbled_stream_or_another_fingerprint_is_refused() {
        let src = tempfile::tempdir().expect("tmp");
        write(src.path(), fp(), b"state");
        let bytes = stream_of(src.path());
        let dst = tempfile::tempdir().expect("tmp");
        let e = decode_bytes(&bytes[..bytes.len() - 1000], dst.path())
            .await
            .expect_err("truncated");
        assert_eq!(e.code(), "ship_truncated");
        let e = decode_bytes(b"GET / HTTP/1.1\r\n\r\n", dst.path())
            .await
            .expect_err("garbage");
        assert_eq!(e.code(), "ship_bad_stream");
        // A header made for another machine: refused before any file is read.
        let mut other = fp();
        other.machine.memory_mib = 256;
        write(src.path(), other, b"state");
        let fresh = tempfile::tempdir().expect("tmp");
        let e = decode_bytes(&stream_of(src.path()), fresh.path())
            .await
            .expect_err("mismatch");
        assert_eq!(e.code(), "substrate_mismatch");
        assert!(!Substrate::state_path(fresh.path()).exists());
        // A header that is not JSON.
        let mut bad = bytes.clone();
        let at = 8 + 4 + 1 + 1 + SHIPPED[0].len() + 8 + 5;
        bad[at] = b'#';
        let e = decode_bytes(&bad, dst.path())
            .await
            .expect_err("bad header");
        assert_eq!(e.code(), "substrate_corrupt");
    }

    #[tokio::test]
    async fn a_fetched_file_that_differs_from_its_digest_does_not_open() {
        let src = tempfile::tempdir().expect("tmp");
        write(src.path(), fp(), b"state");
        // The RAM file changed after docking (as on a source whose file was damaged).
        let ram = Substrate::ram_path(src.path());
        let mut bytes = std::fs::read(&ram).expect("ram");
        bytes[12345] ^= 0xff;
        std::fs::write(&ram, bytes).expect("damage");
        let dst = tempfile::tempdir().expect("tmp");
        decode_bytes(&stream_of(src.path()), dst.path())
            .await
            .expect("the stream itself is fine");
        let e = Substrate::open(dst.path(), &fp()).expect_err("damaged");
        assert_eq!(e.code(), "substrate_damaged");
    }

    /// A peer on a real socket that answers 200 with `head` of a longer body, then stalls
    /// (`stall`) or hangs up.
    async fn bad_peer(head: Vec<u8>, stall: bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.expect("accept");
            let mut req = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut sock, &mut req).await;
            let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", 1 << 20);
            sock.write_all(answer.as_bytes()).await.expect("write");
            sock.write_all(&head).await.expect("write");
            if stall {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        url
    }

    #[tokio::test]
    async fn a_peer_that_hangs_up_or_stalls_mid_stream_is_given_up() {
        let src = tempfile::tempdir().expect("tmp");
        write(src.path(), fp(), b"state");
        let head = stream_of(src.path())[..5000].to_vec();
        let dst = tempfile::tempdir().expect("tmp");
        let fetch = |url: String, timeout| {
            let into = dst.path().to_owned();
            async move { fetch(&url, "g", "arena", &fp(), &into, timeout).await }
        };
        let cut = bad_peer(head.clone(), false).await;
        let e = fetch(cut, Duration::from_secs(10))
            .await
            .expect_err("cut short");
        assert_eq!(e.code(), "ship_truncated", "{e}");
        let stalled = bad_peer(head, true).await;
        let e = fetch(stalled, Duration::from_millis(500))
            .await
            .expect_err("stalled");
        assert_eq!(e.code(), "ship_timeout", "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_lets_one_fetch_of_its_image_in_within_its_ttl() {
        let ship = Ship::default();
        assert_eq!(ship.redeem("g1", "arena"), Err(PeerError::UnknownGrant));
        ship.grant("arena".into(), "g1".into(), Duration::from_secs(30));
        assert_eq!(ship.redeem("g1", "duel"), Err(PeerError::GrantMismatch));
        assert_eq!(ship.redeem("g1", "arena"), Ok(()));
        assert_eq!(ship.redeem("g1", "arena"), Err(PeerError::GrantUsed));
        ship.grant("arena".into(), "g2".into(), Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(ship.redeem("g2", "arena"), Err(PeerError::GrantExpired));
    }

    #[tokio::test(start_paused = true)]
    async fn a_want_is_sent_once_per_connection_and_answered_or_timed_out() {
        let ship = Ship::default();
        let asking = tokio::spawn({
            let ship = ship.clone();
            async move {
                ship.ask("arena", "sha256:a".into(), Duration::from_secs(5))
                    .await
            }
        });
        ship.wanted().await;
        tokio::task::yield_now().await;
        let sent = ship.take_unsent();
        assert_eq!(
            sent,
            vec![HostMessage::WantSubstrate {
                image: "arena".into(),
                fingerprint: "sha256:a".into()
            }]
        );
        assert!(ship.take_unsent().is_empty(), "once per connection");
        ship.resend();
        assert_eq!(ship.take_unsent().len(), 1, "again on a new connection");
        let offer = Offer::Fetch {
            from: "http://10.0.0.2:7072".into(),
            grant: "g".into(),
        };
        ship.answer("arena", offer.clone());
        assert_eq!(asking.await.expect("no panic"), offer);
        let unanswered = ship.ask("arena", "sha256:a".into(), Duration::from_secs(5));
        assert_eq!(
            unanswered.await,
            Offer::Prime {
                reason: "no_answer".into()
            }
        );
        assert!(ship.take_unsent().is_empty(), "a want ends with its ask");
    }
}
