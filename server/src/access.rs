//! Who may use the server's HTTP surfaces (the admin API, the dashboard's feed, the players'
//! region list): the bearer token check by role, and the one error answer they give.

use crate::auth::{Claims, Role};
use crate::state::Ctx;
use crate::wire;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An error answer: `{"code": …, "message": …}` with an HTTP status.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub &'static str, pub String);

pub use berth_protocol::api::ErrorBody;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody::new(self.1, self.2))).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "admin: store");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            e.code(),
            "state store unavailable".into(),
        )
    }
}

/// An authenticated operator (admin-role bearer token).
#[derive(Debug)]
pub struct Admin(pub String);

impl FromRequestParts<Ctx> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, ctx: &Ctx) -> Result<Self, ApiError> {
        verify_admin(ctx, &parts.headers).map(|c| Admin(c.sub))
    }
}

/// Checks the request's admin-role bearer token: 401 without a valid token, 403 with another
/// role's. The claims tell how long the token is good for (the event feed ends there).
pub fn verify_admin(ctx: &Ctx, headers: &HeaderMap) -> Result<Claims, ApiError> {
    verify_role(ctx, headers, Role::Admin)
}

/// Checks the request's bearer token for `role`: 401 without a valid token, 403 with another
/// role's.
pub fn verify_role(ctx: &Ctx, headers: &HeaderMap, role: Role) -> Result<Claims, ApiError> {
    let token = wire::bearer(headers).unwrap_or_default();
    ctx.auth.verify(&token, role).map_err(|e| {
        ctx.metrics.refuse(e.code());
        let status = if e.code() == "wrong_role" {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        ApiError(status, e.code(), e.to_string())
    })
}
