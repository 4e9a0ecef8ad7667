//! What Berth's HTTP APIs answer on failure: the server's admin API (`/v1/admin/…`) and
//! hostd's control API answer every refusal with an HTTP status and this one body.

use crate::codes::ErrorCode;
use serde::{Deserialize, Serialize};

/// `{"code": …, "message": …}`: `code` is stable (see [`ErrorCode`]), `message` is for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<ErrorCode>, message: impl Into<String>) -> Self {
        ErrorBody {
            code: code.into(),
            message: message.into(),
        }
    }
}
