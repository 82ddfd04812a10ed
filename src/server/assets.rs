//! The page and the API document, built into the binary.

use actix_web::HttpRequest;
use actix_web::HttpResponse;

use super::error_response;
use streamdet_actors::ErrorCode;

/// The API description, served as written (a test keeps it and the routes in step).
pub const OPENAPI: &str = include_str!("../web/openapi.json");

/// The page at `/` (watch detections arrive during an upload), built into the binary.
pub const PAGE_ASSETS: [(&str, &str, &str); 3] = [
    ("/", "text/html; charset=utf-8", include_str!("../web/index.html")),
    ("/app.js", "text/javascript; charset=utf-8", include_str!("../web/app.js")),
    ("/style.css", "text/css; charset=utf-8", include_str!("../web/style.css")),
];

pub async fn page_asset(req: HttpRequest) -> HttpResponse {
    let Some((_, content_type, body)) = PAGE_ASSETS.iter().find(|(path, _, _)| *path == req.path()) else {
        return error_response(ErrorCode::NotFound, "no such page");
    };
    HttpResponse::Ok()
        .content_type(*content_type)
        // The page talks to this server only; videos and images are shown from local blobs.
        .insert_header((
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        ))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Cache-Control", "no-cache"))
        .body(*body)
}

pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(OPENAPI)
}
