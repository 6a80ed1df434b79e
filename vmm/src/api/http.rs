//! Just enough HTTP/1.1 for a local control API: one request per
//! connection, a Content-Length body at most, JSON answers.

use std::io::{self, BufRead, BufReader, Read, Write};

/// Requests larger than this are refused; the API has nothing that big.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("malformed request line")]
    RequestLine,
    #[error("malformed header line")]
    Header,
    #[error("invalid Content-Length")]
    ContentLength,
    #[error("request larger than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error("connection closed before the request was complete")]
    Truncated,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads one request from `stream`.
pub fn read_request(stream: impl Read) -> Result<Request, HttpError> {
    let mut reader = BufReader::new(stream.take(MAX_REQUEST_BYTES as u64 + 1));
    let mut line = String::new();
    let mut consumed = 0;
    let mut next_line = |reader: &mut BufReader<_>, line: &mut String| -> Result<(), HttpError> {
        line.clear();
        let n = reader.read_line(line)?;
        consumed += n;
        if consumed > MAX_REQUEST_BYTES {
            return Err(HttpError::TooLarge);
        }
        if n == 0 || !line.ends_with('\n') {
            return Err(HttpError::Truncated);
        }
        Ok(())
    };
    next_line(&mut reader, &mut line)?;
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::RequestLine);
    };
    if !version.starts_with("HTTP/1.") || !path.starts_with('/') || method.is_empty() {
        return Err(HttpError::RequestLine);
    }
    let (method, path) = (method.to_string(), path.to_string());
    let mut content_length = 0usize;
    loop {
        next_line(&mut reader, &mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').ok_or(HttpError::Header)?;
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value.trim().parse().map_err(|_| HttpError::ContentLength)?;
        }
    }
    if content_length > MAX_REQUEST_BYTES {
        return Err(HttpError::TooLarge);
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => HttpError::Truncated,
        _ => HttpError::Io(e),
    })?;
    Ok(Request { method, path, body })
}

pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response {
            status,
            body: value.to_string(),
        }
    }

    pub fn error(status: u16, reason: impl std::fmt::Display) -> Response {
        Response::json(status, &serde_json::json!({ "error": reason.to_string() }))
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

pub fn write_response(mut stream: impl Write, response: &Response) -> io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        response.status,
        reason_phrase(response.status),
        response.body.len(),
        response.body
    )?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_get_request_is_parsed() {
        let request = read_request(&b"GET /counters HTTP/1.1\r\nHost: x\r\n\r\n"[..]).unwrap();
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/counters");
        assert!(request.body.is_empty());
    }

    #[test]
    fn a_body_is_read_to_its_content_length() {
        let raw = b"PUT /memory HTTP/1.1\r\nContent-Length: 13\r\n\r\n{\"size\":\"1G\"}extra";
        let request = read_request(&raw[..]).unwrap();
        assert_eq!(request.body, b"{\"size\":\"1G\"}");
    }

    #[test]
    fn malformed_requests_are_refused() {
        assert!(matches!(
            read_request(&b"GARBAGE\r\n\r\n"[..]),
            Err(HttpError::RequestLine)
        ));
        assert!(matches!(
            read_request(&b"GET nopath HTTP/1.1\r\n\r\n"[..]),
            Err(HttpError::RequestLine)
        ));
        assert!(matches!(
            read_request(&b"GET / HTTP/1.1\r\nbad header\r\n\r\n"[..]),
            Err(HttpError::Header)
        ));
        assert!(matches!(
            read_request(&b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"[..]),
            Err(HttpError::ContentLength)
        ));
        assert!(matches!(
            read_request(&b"GET / HTTP/1.1\r\n"[..]),
            Err(HttpError::Truncated)
        ));
        assert!(matches!(
            read_request(&b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"[..]),
            Err(HttpError::Truncated)
        ));
        let huge = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_REQUEST_BYTES));
        assert!(matches!(
            read_request(huge.as_bytes()),
            Err(HttpError::TooLarge)
        ));
    }

    #[test]
    fn responses_carry_length_and_json() {
        let mut out = Vec::new();
        write_response(&mut out, &Response::error(404, "no such path")).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Content-Length: 24\r\n"));
        assert!(text.ends_with("{\"error\":\"no such path\"}"));
    }
}
