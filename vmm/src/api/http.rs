//! Just enough HTTP/1.1 for a local control API: one request per
//! connection, a Content-Length body at most, JSON answers. The request
//! line and headers are parsed by httparse; this module adds the limits
//! and the strict reading of Content-Length.

/// Request line plus headers larger than this are refused with 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// More header lines than this are refused with 431.
pub const MAX_HEADERS: usize = 32;
/// Bodies larger than this are refused with 413; the API has nothing that big.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// The most a client can make the server buffer for one request.
pub const MAX_REQUEST_BYTES: usize = MAX_HEAD_BYTES + MAX_BODY_BYTES;

#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("invalid Content-Length: expected one decimal byte count")]
    ContentLength,
    #[error("request line and headers larger than {MAX_HEAD_BYTES} bytes or more than {MAX_HEADERS} headers")]
    HeadTooLarge,
    #[error("body larger than {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    #[error("Transfer-Encoding is not supported; send a Content-Length")]
    TransferEncoding,
    #[error("connection closed before the request was complete")]
    Truncated,
    #[error("the request was not complete within {0} ms")]
    Timeout(u128),
}

impl HttpError {
    /// The status code that answers this error.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) | HttpError::ContentLength | HttpError::Truncated => 400,
            HttpError::Timeout(_) => 408,
            HttpError::BodyTooLarge => 413,
            HttpError::HeadTooLarge => 431,
            HttpError::TransferEncoding => 501,
        }
    }
}

fn malformed(error: httparse::Error) -> HttpError {
    match error {
        httparse::Error::TooManyHeaders => HttpError::HeadTooLarge,
        httparse::Error::HeaderName => HttpError::Malformed("bad header name"),
        httparse::Error::HeaderValue => HttpError::Malformed("bad header value"),
        httparse::Error::NewLine => HttpError::Malformed("bad line ending"),
        httparse::Error::Status => HttpError::Malformed("bad status"),
        httparse::Error::Token => HttpError::Malformed("bad method or path"),
        httparse::Error::Version => HttpError::Malformed("bad HTTP version"),
    }
}

/// Parses one request from the bytes received so far: `Ok(None)` while
/// more bytes are needed. Bytes after the body are ignored.
pub fn parse(received: &[u8]) -> Result<Option<Request>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(received).map_err(malformed)? {
        httparse::Status::Partial if received.len() > MAX_HEAD_BYTES => {
            return Err(HttpError::HeadTooLarge)
        }
        httparse::Status::Partial => return Ok(None),
        httparse::Status::Complete(n) if n > MAX_HEAD_BYTES => return Err(HttpError::HeadTooLarge),
        httparse::Status::Complete(n) => n,
    };
    let (Some(method), Some(path), Some(1)) = (request.method, request.path, request.version)
    else {
        return Err(HttpError::Malformed("expected METHOD /path HTTP/1.1"));
    };
    if !path.starts_with('/') {
        return Err(HttpError::Malformed("the path must start with /"));
    }
    let mut content_length = None;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::TransferEncoding);
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Err(HttpError::ContentLength);
            }
            content_length = Some(parse_content_length(header.value)?);
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_BODY_BYTES {
        return Err(HttpError::BodyTooLarge);
    }
    // head_len <= MAX_HEAD_BYTES and body_len <= MAX_BODY_BYTES: no overflow.
    let Some(body) = received.get(head_len..head_len + body_len) else {
        return Ok(None);
    };
    Ok(Some(Request {
        method: method.to_string(),
        path: path.to_string(),
        body: body.to_vec(),
    }))
}

/// Only plain decimal digits (RFC 9110 §8.6: 1*DIGIT): no sign, no
/// spaces inside, no list of values.
fn parse_content_length(value: &[u8]) -> Result<usize, HttpError> {
    let value = value.trim_ascii();
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::ContentLength);
    }
    value.iter().try_fold(0usize, |n, digit| {
        n.checked_mul(10)
            .and_then(|n| n.checked_add(usize::from(digit - b'0')))
            .ok_or(HttpError::BodyTooLarge)
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
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

    /// The answer to a request that could not be parsed.
    pub fn from_error(error: &HttpError) -> Response {
        Response::error(error.status(), error)
    }

    /// The whole answer as sent on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            self.status,
            reason_phrase(self.status),
            self.body.len(),
            self.body
        )
        .into_bytes()
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(raw: &[u8]) -> Result<Request, HttpError> {
        parse(raw).map(|r| r.expect("request is complete"))
    }

    #[test]
    fn a_get_request_is_parsed() {
        let request = complete(b"GET /counters HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/counters");
        assert!(request.body.is_empty());
    }

    #[test]
    fn a_body_is_read_to_its_content_length() {
        let raw = b"PUT /memory HTTP/1.1\r\nContent-Length: 13\r\n\r\n{\"size\":\"1G\"}extra";
        assert_eq!(complete(raw).unwrap().body, b"{\"size\":\"1G\"}");
    }

    #[test]
    fn a_request_arriving_in_pieces_is_complete_only_at_the_end() {
        let raw = b"PUT /memory HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody";
        for end in 0..raw.len() {
            assert_eq!(parse(&raw[..end]), Ok(None), "{end} bytes");
        }
        assert_eq!(complete(raw).unwrap().body, b"body");
    }

    #[test]
    fn malformed_requests_are_refused() {
        for raw in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET nopath HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
        ] {
            assert!(
                matches!(parse(raw), Err(HttpError::Malformed(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(raw),
                parse(raw)
            );
        }
    }

    #[test]
    fn content_length_is_one_plain_decimal_number() {
        for value in ["+5", "-1", "x", "", "5 5", "5,5", "0x5", " +5"] {
            let raw = format!("PUT / HTTP/1.1\r\nContent-Length: {value}\r\n\r\nhello");
            assert_eq!(
                parse(raw.as_bytes()),
                Err(HttpError::ContentLength),
                "Content-Length: {value:?}"
            );
        }
        let twice = b"PUT / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse(twice), Err(HttpError::ContentLength));
        let huge = b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert_eq!(parse(huge), Err(HttpError::BodyTooLarge));
        let chunked = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(chunked), Err(HttpError::TransferEncoding));
    }

    #[test]
    fn oversized_requests_get_431_or_413() {
        let long_path = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(long_path.as_bytes()), Err(HttpError::HeadTooLarge));
        // Still incomplete, but already too long to ever fit.
        let endless = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse(endless.as_bytes()), Err(HttpError::HeadTooLarge));
        let many = format!(
            "GET / HTTP/1.1\r\n{}\r\n",
            "X: y\r\n".repeat(MAX_HEADERS + 1)
        );
        assert_eq!(parse(many.as_bytes()), Err(HttpError::HeadTooLarge));
        let big_body = format!(
            "PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert_eq!(parse(big_body.as_bytes()), Err(HttpError::BodyTooLarge));
        assert_eq!(HttpError::HeadTooLarge.status(), 431);
        assert_eq!(HttpError::BodyTooLarge.status(), 413);
    }

    #[test]
    fn responses_carry_length_and_json() {
        let text = String::from_utf8(Response::error(404, "no such path").to_bytes()).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Content-Length: 24\r\n"));
        assert!(text.ends_with("{\"error\":\"no such path\"}"));
    }
}
