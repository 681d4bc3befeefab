//! The OCI error envelope (`{"errors":[{"code","message","detail"}]}`, distribution-spec "Error Codes")
//! and the one table that maps each code to its HTTP status.
//!
//! Every failure regmux answers with goes through [`OciError`]; nothing else picks a status code, so
//! codes and statuses cannot drift apart.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    BlobUnknown,
    DigestInvalid,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    Unauthorized,
    Denied,
    Unsupported,
    /// distribution's `errcode.ErrorCodeUnavailable`: the service is unavailable (here: every backend
    /// that could have had the object failed).
    Unavailable,
    TooManyRequests,
}

impl ErrorCode {
    pub fn status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ErrorCode::BlobUnknown | ErrorCode::ManifestUnknown | ErrorCode::NameUnknown => S::NOT_FOUND,
            ErrorCode::DigestInvalid | ErrorCode::ManifestInvalid | ErrorCode::NameInvalid => S::BAD_REQUEST,
            ErrorCode::Unauthorized => S::UNAUTHORIZED,
            ErrorCode::Denied => S::FORBIDDEN,
            ErrorCode::Unsupported => S::METHOD_NOT_ALLOWED,
            ErrorCode::Unavailable => S::SERVICE_UNAVAILABLE,
            ErrorCode::TooManyRequests => S::TOO_MANY_REQUESTS,
        }
    }

    /// The spec's default message for the code.
    pub fn message(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "blob unknown to registry",
            ErrorCode::DigestInvalid => "provided digest did not match uploaded content",
            ErrorCode::ManifestInvalid => "manifest invalid",
            ErrorCode::ManifestUnknown => "manifest unknown",
            ErrorCode::NameInvalid => "invalid repository name",
            ErrorCode::NameUnknown => "repository name not known to registry",
            ErrorCode::Unauthorized => "authentication required",
            ErrorCode::Denied => "requested access to the resource is denied",
            ErrorCode::Unsupported => "The operation is unsupported.",
            ErrorCode::Unavailable => "service unavailable",
            ErrorCode::TooManyRequests => "too many requests",
        }
    }
}

/// One error answer: a code, an optional more specific message and an optional JSON detail. The
/// status is always the code's ([`ErrorCode::status`]).
#[derive(Debug, Clone)]
pub struct OciError {
    pub code: ErrorCode,
    pub message: Option<String>,
    pub detail: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    errors: [Entry<'a>; 1],
}

#[derive(Serialize)]
struct Entry<'a> {
    code: ErrorCode,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a serde_json::Value>,
}

impl OciError {
    pub fn new(code: ErrorCode) -> Self {
        OciError { code, message: None, detail: None }
    }
    pub fn message(mut self, m: impl Into<String>) -> Self {
        self.message = Some(m.into());
        self
    }
    pub fn detail(mut self, d: serde_json::Value) -> Self {
        self.detail = Some(d);
        self
    }
    pub fn status(&self) -> http::StatusCode {
        self.code.status()
    }
    /// The JSON body.
    pub fn body(&self) -> String {
        let env = Envelope {
            errors: [Entry {
                code: self.code,
                message: self.message.as_deref().unwrap_or(self.code.message()),
                detail: self.detail.as_ref(),
            }],
        };
        serde_json::to_string(&env).unwrap_or_else(|_| String::from(r#"{"errors":[]}"#))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let table = [
            (ErrorCode::BlobUnknown, 404),
            (ErrorCode::ManifestUnknown, 404),
            (ErrorCode::NameUnknown, 404),
            (ErrorCode::NameInvalid, 400),
            (ErrorCode::DigestInvalid, 400),
            (ErrorCode::ManifestInvalid, 400),
            (ErrorCode::Unsupported, 405),
            (ErrorCode::Unavailable, 503),
            (ErrorCode::Unauthorized, 401),
        ];
        for (code, status) in table {
            assert_eq!(code.status().as_u16(), status, "{code:?}");
        }
    }

    #[test]
    fn envelope() {
        let e = OciError::new(ErrorCode::BlobUnknown).detail(serde_json::json!({"attempts": ["a: 404"]}));
        assert_eq!(
            e.body(),
            r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":{"attempts":["a: 404"]}}]}"#
        );
        let e = OciError::new(ErrorCode::Unsupported).message("x");
        assert_eq!(e.status(), http::StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(e.body(), r#"{"errors":[{"code":"UNSUPPORTED","message":"x"}]}"#);
    }
}
