//! The browser client the server serves itself: the chat page and the
//! client library, embedded in the binary (or read from `client.dir`), with a
//! strict Content-Security-Policy.

use std::path::Path;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;

use crate::refusal::Refusal;

/// A file of the client.
struct Asset {
    /// URL path.
    path: &'static str,
    /// File name in `client/` (or `client.dir`).
    file: &'static str,
    content_type: &'static str,
    embedded: &'static [u8],
}

const ASSETS: [Asset; 5] = [
    Asset {
        path: "/",
        file: "index.html",
        content_type: "text/html; charset=utf-8",
        embedded: include_bytes!("../client/index.html"),
    },
    Asset {
        path: "/app.js",
        file: "app.js",
        content_type: "text/javascript; charset=utf-8",
        embedded: include_bytes!("../client/app.js"),
    },
    Asset {
        path: "/securechat.js",
        file: "securechat.js",
        content_type: "text/javascript; charset=utf-8",
        embedded: include_bytes!("../client/securechat.js"),
    },
    Asset {
        path: "/securechat.d.ts",
        file: "securechat.d.ts",
        content_type: "application/typescript; charset=utf-8",
        embedded: include_bytes!("../client/securechat.d.ts"),
    },
    Asset {
        path: "/style.css",
        file: "style.css",
        content_type: "text/css; charset=utf-8",
        embedded: include_bytes!("../client/style.css"),
    },
];

/// No inline script or style, no eval, sockets only to this server, never
/// framed.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// The client file at `path`, if there is one; `dir` replaces the embedded
/// files when set.
pub fn serve(method: &Method, path: &str, dir: Option<&Path>) -> Option<Response<Full<Bytes>>> {
    let asset = ASSETS.iter().find(|a| a.path == path)?;
    if method != Method::GET && method != Method::HEAD {
        return Some(Refusal::MethodNotAllowed.response());
    }
    let body = match dir {
        // Only the fixed file names above are ever read: no path from the
        // request reaches the file system.
        Some(dir) => match std::fs::read(dir.join(asset.file)) {
            Ok(bytes) => Bytes::from(bytes),
            Err(_) => return Some(Refusal::NotFound.response()),
        },
        None => Bytes::from_static(asset.embedded),
    };
    let body = if method == Method::HEAD {
        Bytes::new()
    } else {
        body
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Some(response)
}
