//! A small blocking HTTP/1.1 client for the local API (CLI and tests). Loopback only, no TLS.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("API URL {0:?} must look like http://127.0.0.1:PORT")]
    BadUrl(String),
    #[error("cannot reach the agent API at {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("malformed HTTP response from the agent: {0}")]
    Protocol(String),
}

fn host_of(base: &str) -> Result<String, ClientError> {
    let rest = base
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::BadUrl(base.into()))?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(ClientError::BadUrl(base.into()));
    }
    Ok(host.to_string())
}

/// Sends one request; the response body is written to `sink` as it arrives (chunked or not).
/// Returns the status code.
pub fn request_to(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    extra_headers: &[(&str, &str)],
    sink: &mut dyn Write,
) -> Result<u16, ClientError> {
    let host = host_of(base)?;
    let io = |source| ClientError::Io {
        addr: host.clone(),
        source,
    };
    let mut s = TcpStream::connect(&host).map_err(io)?;
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in extra_headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).map_err(io)?;
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("status line {line:?}")))?;
    let mut chunked = false;
    let mut len: Option<usize> = None;
    loop {
        line.clear();
        r.read_line(&mut line).map_err(io)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                len = v.parse().ok();
            }
        }
    }
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).map_err(io)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| ClientError::Protocol(format!("chunk size {line:?}")))?;
            if size == 0 {
                break;
            }
            let mut buf = vec![0u8; size];
            r.read_exact(&mut buf).map_err(io)?;
            sink.write_all(&buf).map_err(io)?;
            let _ = sink.flush();
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).map_err(io)?;
        }
    } else if let Some(n) = len {
        let mut buf = vec![0u8; n];
        r.read_exact(&mut buf).map_err(io)?;
        sink.write_all(&buf).map_err(io)?;
    } else {
        let mut buf = Vec::new();
        r.read_to_end(&mut buf).map_err(io)?;
        sink.write_all(&buf).map_err(io)?;
    }
    Ok(code)
}

/// One request, whole body returned.
pub fn request(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    extra_headers: &[(&str, &str)],
) -> Result<(u16, Vec<u8>), ClientError> {
    let mut out = Vec::new();
    let code = request_to(base, method, path, body, extra_headers, &mut out)?;
    Ok((code, out))
}
