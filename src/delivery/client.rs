//! The HTTP/1.1 connection pool to the app: hyper's pooled client, over TCP (rustls for
//! `https://`) or a Unix domain socket.
//!
//! hyper directly rather than reqwest: per request, reqwest adds a redirect policy, a retry
//! layer, a URL parse and a response decoder around this same client (~7 % of the process's
//! CPU in single mode, see BENCHMARKS.md); the sidecar needs none of them. What reqwest did
//! that matters is kept here: `Accept: */*`, the URL's userinfo sent as Basic auth, one
//! timeout over the whole exchange, and a connect timeout.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::config::AppTarget;
use crate::retry::{parse_retry_after, Transport};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The most bytes of an answer read: a batch's `results` array takes ~20 bytes a record, a
/// larger body is the app's mistake and must not cost the sidecar memory. The status of
/// such an answer still counts (the connection is then closed, not reused).
pub const MAX_RESPONSE_BYTES: usize = 8 << 20;

/// Where requests go: the request URI (userinfo removed) and the Basic auth it carried.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub uri: Uri,
    authorization: Option<HeaderValue>,
}

impl Endpoint {
    /// Parses `app.url` or `app.health_url`; the error names what is wrong, not the URL
    /// (it may hold credentials).
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let target = AppTarget::parse(url).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut parsed: reqwest::Url = target
            .request_url()
            .parse()
            .map_err(|e| anyhow::anyhow!("is not a valid URL: {e}"))?;
        let authorization = basic_auth(&parsed);
        // Only fails for URLs that cannot have credentials, which then have none to remove.
        let _ = parsed.set_username("");
        let _ = parsed.set_password(None);
        let uri = parsed
            .as_str()
            .parse()
            .map_err(|e| anyhow::anyhow!("is not a valid request URI: {e}"))?;
        Ok(Self { uri, authorization })
    }
}

/// `Authorization: Basic` from the URL's userinfo (percent-decoded), as browsers and reqwest
/// send it; None without a user name and password.
fn basic_auth(url: &reqwest::Url) -> Option<HeaderValue> {
    if url.username().is_empty() && url.password().is_none() {
        return None;
    }
    let decode = |s: &str| percent_encoding::percent_decode_str(s).collect::<Vec<u8>>();
    let mut credentials = decode(url.username());
    credentials.push(b':');
    credentials.extend(decode(url.password().unwrap_or_default()));
    let mut value = HeaderValue::from_str(&format!("Basic {}", B64.encode(credentials))).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// The pooled client, shared by all workers (cheap to clone).
#[derive(Clone)]
pub struct Http {
    client: Client<HttpsConnector<Connector>, Full<Bytes>>,
    /// `app.headers` and `Accept`, sent with every request.
    default_headers: Arc<HeaderMap>,
    timeout: Duration,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Http {
    /// A client for `socket` (a Unix socket path) or TCP, with `app.headers` on every request.
    pub fn new(
        socket: Option<&str>,
        mut default_headers: HeaderMap,
        timeout: Duration,
        connect_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let connector = match socket {
            Some(path) => Connector::Unix {
                socket: Arc::from(Path::new(path)),
                timeout: connect_timeout,
            },
            None => {
                let mut tcp = HttpConnector::new();
                tcp.enforce_http(false); // https:// goes through to rustls
                tcp.set_nodelay(true);
                tcp.set_connect_timeout(Some(connect_timeout));
                Connector::Tcp(tcp)
            }
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .try_with_platform_verifier()
            .map_err(|e| anyhow::anyhow!("cannot load the system's TLS root certificates: {e}"))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        default_headers.entry(ACCEPT).or_insert(HeaderValue::from_static("*/*"));
        Ok(Self {
            client,
            default_headers: Arc::new(default_headers),
            timeout,
        })
    }

    /// A request to `endpoint` with the default headers, then `headers` (they win).
    pub fn request(
        &self,
        method: Method,
        endpoint: &Endpoint,
        headers: HeaderMap,
        body: Bytes,
    ) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = endpoint.uri.clone();
        let h = request.headers_mut();
        *h = headers;
        for (name, value) in self.default_headers.iter() {
            if !h.contains_key(name) {
                h.insert(name, value.clone());
            }
        }
        if let Some(auth) = &endpoint.authorization {
            h.insert(AUTHORIZATION, auth.clone());
        }
        request
    }

    /// Sends `request` and reads the answer, all within `app.timeout`: what the transport saw,
    /// and the answer's body (empty without an answer, or when it was over
    /// [`MAX_RESPONSE_BYTES`]).
    pub async fn exchange(&self, request: Request<Full<Bytes>>) -> (Transport, Bytes) {
        match tokio::time::timeout(self.timeout, self.exchange_untimed(request)).await {
            Ok(exchange) => exchange,
            Err(_) => (Transport::Timeout, Bytes::new()),
        }
    }

    async fn exchange_untimed(&self, request: Request<Full<Bytes>>) -> (Transport, Bytes) {
        let response = match self.client.request(request).await {
            Ok(r) => r,
            Err(e) if e.is_connect() => return (Transport::Unreachable(error_chain(&e)), Bytes::new()),
            Err(e) => return (Transport::Failed(error_chain(&e)), Bytes::new()),
        };
        let (parts, body) = response.into_parts();
        let status = parts.status.as_u16();
        let retry_after = parts
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        // Read to the end so the connection goes back to the pool.
        let body = match Limited::new(body, MAX_RESPONSE_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                tracing::warn!(
                    status,
                    limit = MAX_RESPONSE_BYTES,
                    "the app's answer is larger than the limit; its body is ignored, its status applies"
                );
                Bytes::new()
            }
            Err(e) => return (Transport::Failed(error_chain(e.as_ref())), Bytes::new()),
        };
        (Transport::Status { status, retry_after }, body)
    }
}

/// The whole error chain: hyper's top-level message hides the cause ("client error (Connect)").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Opens connections to the app: TCP, or the Unix socket for every URI.
#[derive(Clone)]
pub enum Connector {
    Tcp(HttpConnector),
    Unix { socket: Arc<Path>, timeout: Duration },
}

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Self::Tcp(tcp) => tcp.poll_ready(cx).map_err(Into::into),
            Self::Unix { .. } => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        match self {
            Self::Tcp(tcp) => {
                let connecting = tcp.call(uri);
                Box::pin(async move { Ok(Stream::Tcp(connecting.await?)) })
            }
            Self::Unix { socket, timeout } => {
                let (socket, timeout) = (socket.clone(), *timeout);
                Box::pin(async move {
                    let why = |e: &dyn std::fmt::Display| format!("connecting to the socket {}: {e}", socket.display());
                    match tokio::time::timeout(timeout, tokio::net::UnixStream::connect(&*socket)).await {
                        Ok(Ok(stream)) => Ok(Stream::Unix(TokioIo::new(stream))),
                        Ok(Err(e)) => Err(io::Error::new(e.kind(), why(&e)).into()),
                        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, why(&"timed out")).into()),
                    }
                })
            }
        }
    }
}

/// A connection to the app.
pub enum Stream {
    Tcp(TokioIo<tokio::net::TcpStream>),
    Unix(TokioIo<tokio::net::UnixStream>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Self::Tcp(s) => s.connected(),
            Self::Unix(_) => Connected::new(),
        }
    }
}

impl Read for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl Write for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn client(timeout: Duration) -> Http {
        let mut headers = HeaderMap::new();
        headers.insert("x-team", HeaderValue::from_static("orders"));
        Http::new(None, headers, timeout, Duration::from_secs(2)).unwrap()
    }

    /// A one-connection server: reads the request head, answers with `answer` and keeps the
    /// connection open for a minute (or until the client closes it). Returns its URL and the
    /// request head it read.
    async fn raw_server(answer: Vec<u8>) -> (String, tokio::sync::oneshot::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let (head_tx, head_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            // A writer that fails (the client hung up) ends the answer; that is the point.
            let _ = conn.write_all(&answer).await;
            let _ = head_tx.send(String::from_utf8_lossy(&head).into_owned());
            let hold = tokio::time::sleep(Duration::from_secs(60));
            tokio::select! { _ = hold => {}, _ = conn.read(&mut buf) => {} }
        });
        (url, head_rx)
    }

    async fn get(http: &Http, url: &str) -> (Transport, Bytes) {
        let endpoint = Endpoint::parse(url).unwrap();
        http.exchange(http.request(Method::GET, &endpoint, HeaderMap::new(), Bytes::new()))
            .await
    }

    #[tokio::test]
    async fn a_port_nobody_listens_on_is_unreachable_not_a_failure() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        match get(&client(Duration::from_secs(5)), &format!("http://127.0.0.1:{port}/")).await {
            (Transport::Unreachable(e), _) => assert!(e.contains("onnection refused"), "{e}"),
            _ => panic!("expected Unreachable"),
        }
    }

    #[tokio::test]
    async fn a_missing_socket_is_unreachable_and_named() {
        let http = Http::new(
            Some("/nonexistent/app.sock"),
            HeaderMap::new(),
            Duration::from_secs(5),
            Duration::from_secs(1),
        )
        .unwrap();
        match get(&http, "unix:///nonexistent/app.sock:/records").await {
            (Transport::Unreachable(e), _) => assert!(e.contains("/nonexistent/app.sock"), "{e}"),
            _ => panic!("expected Unreachable"),
        }
    }

    #[tokio::test]
    async fn an_app_that_never_answers_is_a_timeout() {
        let (url, _server) = raw_server(Vec::new()).await;
        assert!(matches!(
            get(&client(Duration::from_millis(300)), &url).await,
            (Transport::Timeout, _)
        ));
        // A head without its body is a timeout too: app.timeout covers the whole answer.
        let (url, _server) = raw_server(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc".to_vec()).await;
        assert!(matches!(
            get(&client(Duration::from_millis(300)), &url).await,
            (Transport::Timeout, _)
        ));
    }

    #[tokio::test]
    async fn an_answer_over_the_limit_keeps_its_status_and_costs_no_more_than_the_limit() {
        let mut answer = b"HTTP/1.1 200 OK\r\ncontent-length: 100000000\r\nretry-after: 3\r\n\r\n".to_vec();
        answer.resize(answer.len() + MAX_RESPONSE_BYTES + 4096, b'x');
        let (url, _server) = raw_server(answer).await;
        match get(&client(Duration::from_secs(20)), &url).await {
            (Transport::Status { status, retry_after }, body) => {
                assert_eq!(status, 200);
                assert_eq!(retry_after, Some(Duration::from_secs(3)));
                assert!(body.is_empty(), "{} bytes kept", body.len());
            }
            _ => panic!("expected the status"),
        }
    }

    #[tokio::test]
    async fn a_redirect_is_an_answer_not_followed() {
        let (url, _server) =
            raw_server(b"HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:9/\r\ncontent-length: 0\r\n\r\n".to_vec())
                .await;
        assert!(matches!(
            get(&client(Duration::from_secs(5)), &url).await,
            (Transport::Status { status: 302, .. }, _)
        ));
    }

    #[tokio::test]
    async fn garbage_instead_of_http_is_a_failed_exchange() {
        for garbage in [
            b"\x00\xff\xfe\r\n\r\n".to_vec(),
            b"HTTP/1.1 999999 \xff\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec(),
        ] {
            let (url, _server) = raw_server(garbage.clone()).await;
            match get(&client(Duration::from_secs(5)), &url).await {
                (Transport::Failed(e), _) => assert!(!e.is_empty()),
                _ => panic!("expected a failed exchange for {garbage:?}"),
            }
        }
    }

    #[tokio::test]
    async fn the_url_userinfo_is_sent_as_basic_auth_and_not_in_the_request_line() {
        let (url, server) = raw_server(b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()).await;
        let with_user = url.replace("http://", "http://us%20er:p%40ss:w@");
        let http = client(Duration::from_secs(5));
        assert!(matches!(
            get(&http, &format!("{with_user}/healthz?q=1")).await,
            (Transport::Status { status: 204, .. }, _)
        ));
        let head = server.await.unwrap().to_ascii_lowercase();
        let expected = format!("authorization: basic {}", B64.encode("us er:p@ss:w")).to_ascii_lowercase();
        assert!(head.starts_with("get /healthz?q=1 http/1.1\r\n"), "{head}");
        assert!(head.contains(&expected), "{head}");
        assert!(!head.contains("p%40ss") && !head.contains("p@ss"), "{head}");
        assert!(
            head.contains("accept: */*") && head.contains("x-team: orders"),
            "{head}"
        );
        assert!(Endpoint::parse("http://127.0.0.1:1/").unwrap().authorization.is_none());
    }
}
