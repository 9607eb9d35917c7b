//! A minimal HTTP/1.1 GET over a plain socket, for the relay's `/health`, `/health/deep`
//! and `/metrics`, from async tests ([`get`]) and from blocking ones ([`get_blocking`]).

use std::net::SocketAddr;
use std::time::Duration;

fn request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
}

/// GET `path` on `addr`: (status, body). Panics if the server cannot be reached.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.write_all(request(path).as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    parse_response(&buf)
}

/// GET `path` on `addr` from blocking code: (status, body), or `None` if the server
/// cannot be reached (yet, or any more) or does not answer within 5 seconds.
pub fn get_blocking(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(request(path).as_bytes()).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    Some(parse_response(&buf))
}

fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Bodies may come chunked; strip chunk-size lines when they look like hex lengths.
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    (status, body)
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// The `/health/deep` check of the database that holds source `name`.
pub fn database_check(deep: &serde_json::Value, name: &str) -> serde_json::Value {
    deep["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| {
            c["component"]
                .as_str()
                .is_some_and(|s| s.starts_with("database:"))
                && c["details"]["sources"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|n| n == name))
        })
        .unwrap_or_else(|| panic!("no database check lists source {name}: {deep}"))
        .clone()
}
