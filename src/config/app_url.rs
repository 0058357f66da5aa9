//! Where the app listens: `app.url` is an `http://` / `https://` URL, or a Unix domain socket
//! with an HTTP path, `unix:///path/to/app.sock:/records`.
//!
//! The Unix form: `unix://`, then the absolute path of the socket, then `:`, then the HTTP
//! path (with an optional query) the records are POSTed to. The socket path is everything up
//! to the first `:` after `unix://`, so it cannot contain `:`; the HTTP path can. Without
//! `:/path` the records go to `/`. Requests carry `Host: localhost`. TLS is not used over the
//! socket (both ends are in one pod and the socket's file permissions guard it).

/// The parsed form of `app.url` (or `app.health_url`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppTarget<'a> {
    /// An `http://` or `https://` URL, as written.
    Tcp(&'a str),
    /// A Unix domain socket and the HTTP path (with query) requested on it.
    Unix { socket: &'a str, path: &'a str },
}

/// Scheme prefix of a Unix-socket `app.url`.
pub const UNIX_PREFIX: &str = "unix://";

impl<'a> AppTarget<'a> {
    /// Parses `url`; the error says what is wrong, for `app.url` or `app.health_url`.
    pub fn parse(url: &'a str) -> Result<Self, String> {
        if url.is_empty() {
            return Err("is required (e.g. \"http://127.0.0.1:8080/records\")".into());
        }
        let Some(rest) = url.strip_prefix(UNIX_PREFIX) else {
            return match reqwest::Url::parse(url) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(Self::Tcp(url)),
                Ok(_) => Err("must be an http://, https:// or unix:// URL".into()),
                Err(e) => Err(format!("is not a valid URL: {e}")),
            };
        };
        let (socket, path) = match rest.split_once(':') {
            Some((socket, path)) => (socket, path),
            None => (rest, "/"),
        };
        if !socket.starts_with('/') || socket.len() < 2 {
            return Err(format!(
                "must name an absolute socket path after unix:// (e.g. \"unix:///var/run/app/app.sock:/records\"), got {url:?}"
            ));
        }
        if socket.ends_with('/') {
            return Err(format!("names a directory, not a socket file: {socket:?}"));
        }
        if !path.starts_with('/') {
            return Err(format!(
                "must have an HTTP path starting with / after the socket path and ':' (e.g. \"unix://{socket}:/records\"), got {path:?}"
            ));
        }
        match reqwest::Url::parse(&format!("http://localhost{path}")) {
            Ok(_) => Ok(Self::Unix { socket, path }),
            Err(e) => Err(format!("has an HTTP path that is not valid: {e}")),
        }
    }

    /// The URL requests are made to: the URL itself, or `http://localhost<path>` for a socket.
    pub fn request_url(&self) -> String {
        match self {
            Self::Tcp(url) => (*url).to_string(),
            Self::Unix { path, .. } => format!("http://localhost{path}"),
        }
    }

    /// The socket path, for the Unix form.
    pub fn socket(&self) -> Option<&'a str> {
        match self {
            Self::Tcp(_) => None,
            Self::Unix { socket, .. } => Some(socket),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_url_names_the_socket_and_the_http_path() {
        assert_eq!(
            AppTarget::parse("unix:///var/run/app/app.sock:/records?v=1"),
            Ok(AppTarget::Unix {
                socket: "/var/run/app/app.sock",
                path: "/records?v=1"
            })
        );
        let t = AppTarget::parse("unix:///tmp/a.sock").unwrap();
        assert_eq!(t.socket(), Some("/tmp/a.sock"));
        assert_eq!(t.request_url(), "http://localhost/");
        let colon_in_path = AppTarget::parse("unix:///s.sock:/a:b").unwrap();
        assert_eq!(colon_in_path.request_url(), "http://localhost/a:b");
    }

    #[test]
    fn http_urls_stay_as_written() {
        let t = AppTarget::parse("http://127.0.0.1:8080/records").unwrap();
        assert_eq!(t, AppTarget::Tcp("http://127.0.0.1:8080/records"));
        assert_eq!(t.socket(), None);
        assert!(AppTarget::parse("https://app/x").is_ok());
    }

    #[test]
    fn malformed_urls_are_refused_with_a_reason() {
        for (bad, why) in [
            ("", "is required"),
            ("ftp://h/", "must be an http://, https:// or unix://"),
            ("not a url", "is not a valid URL"),
            ("unix://", "absolute socket path"),
            ("unix://relative.sock:/r", "absolute socket path"),
            ("unix:///", "absolute socket path"),
            ("unix:///run/:/r", "names a directory"),
            ("unix:///s.sock:records", "starting with /"),
            ("unix:///s.sock:", "starting with /"),
        ] {
            match AppTarget::parse(bad) {
                Err(e) => assert!(e.contains(why), "{bad:?}: {e}"),
                Ok(t) => panic!("{bad:?} accepted as {t:?}"),
            }
        }
    }

    #[test]
    fn any_accepted_unix_url_gives_a_request_url_on_localhost() {
        for nasty in [
            "unix:///s.sock://evil.example/x",
            "unix:///s.sock:/\u{0}\u{ffff}[%zz",
            "unix:///s\r\n.sock:/r#frag",
            "unix:///\u{1f600}:/\u{7f}",
        ] {
            assert!(nasty != "unix:///s.sock://evil.example/x" || AppTarget::parse(nasty).is_ok());
            if let Ok(t) = AppTarget::parse(nasty) {
                let u = reqwest::Url::parse(&t.request_url()).unwrap();
                assert_eq!(u.host_str(), Some("localhost"), "{nasty:?}");
            }
        }
    }
}
