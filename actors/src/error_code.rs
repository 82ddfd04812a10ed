//! The error codes of the event protocol: one list, each code with its wire name and the HTTP
//! status that says it when it is known before a response starts.

use serde::Serialize;

/// Why a session, a request or a frame failed, as clients see it (`"code"` in an `error` event
/// or an error body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not a container (or image format) the service reads.
    UnsupportedMedia,
    NoVideoStream,
    /// A codec outside the allow-list.
    UnsupportedCodec,
    /// The upload broke off, or the file ends early.
    Truncated,
    /// Over a byte or pixel limit.
    TooLarge,
    /// A cap on concurrent work is reached.
    TooManySessions,
    BadParameter,
    /// The session id is in use.
    Conflict,
    /// A client too slow, or a wait that ran out.
    Timeout,
    Unauthorized,
    /// A request from a foreign origin.
    Forbidden,
    NotFound,
    /// The replica is shutting down and takes no new work: another replica (or a retry) will.
    Unavailable,
    /// Our fault, or a shutdown.
    Internal,
}

impl ErrorCode {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::UnsupportedMedia => "unsupported_media",
            ErrorCode::NoVideoStream => "no_video_stream",
            ErrorCode::UnsupportedCodec => "unsupported_codec",
            ErrorCode::Truncated => "truncated",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::TooManySessions => "too_many_sessions",
            ErrorCode::BadParameter => "bad_parameter",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status of a request refused with this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::UnsupportedMedia | ErrorCode::NoVideoStream | ErrorCode::UnsupportedCodec => 415,
            ErrorCode::TooLarge => 413,
            ErrorCode::TooManySessions => 429,
            ErrorCode::BadParameter | ErrorCode::Truncated => 400,
            ErrorCode::Conflict => 409,
            ErrorCode::Timeout => 408,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    /// Whether an upload that fails this way before its first event is better answered with
    /// an HTTP status than with a stream holding one `error` event: the client sent something
    /// the service will never read.
    pub fn refuses_upload(self) -> bool {
        matches!(self, ErrorCode::UnsupportedMedia | ErrorCode::NoVideoStream | ErrorCode::UnsupportedCodec | ErrorCode::TooLarge)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl From<ErrorCode> for String {
    fn from(code: ErrorCode) -> String {
        code.as_str().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    #[test]
    fn wire_names_are_the_serialised_names() {
        for code in [ErrorCode::UnsupportedMedia, ErrorCode::TooManySessions, ErrorCode::BadParameter, ErrorCode::Internal] {
            assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{}\"", code.as_str()));
        }
        assert_eq!(ErrorCode::TooLarge.http_status(), 413);
        assert!(ErrorCode::UnsupportedCodec.refuses_upload() && !ErrorCode::Timeout.refuses_upload());
    }
}
