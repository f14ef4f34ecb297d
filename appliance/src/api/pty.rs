//! Interactive terminals, as the OpenComputer SDKs open them: create one with a size, stream it
//! over a WebSocket (raw bytes both ways; the socket closes when the shell exits), resize it,
//! kill it. In the guest a terminal is an agent session on a pseudo-terminal, so it is attached
//! to and killed through the exec-session calls.

use serde::Deserialize;
use serde_json::{json, Value};
use tiny_http::Request;

use crate::api::exec::{self, Framing};
use crate::api::validate;
use crate::app::App;
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::http::request::{parse_json, read_body, MAX_JSON_BODY};
use crate::lifecycle::runtime_error;
use crate::runtime::{PtyRequest, RuntimeError};
use crate::sandbox_ops::require_running;

/// The largest number of columns or rows a terminal may have (the agent's own limit).
pub const MAX_SIDE: u16 = agent_protocol::MAX_WINDOW_SIDE;
/// The size of a terminal whose request gives none.
const DEFAULT_SIZE: (u16, u16) = (80, 24);
/// Longest `shell` path accepted.
const MAX_SHELL_PATH: usize = 4096;

/// Sizes are read as JSON values so that a wrong type gets the same message as a wrong range.
#[derive(Deserialize)]
struct CreateBody {
    cols: Option<Value>,
    rows: Option<Value>,
    shell: Option<String>,
}

#[derive(Deserialize)]
struct ResizeBody {
    cols: Option<Value>,
    rows: Option<Value>,
}

/// One side of the terminal: an integer in 1..=`MAX_SIDE`, or `default` when absent.
fn side(name: &str, value: Option<&Value>, default: Option<u16>) -> Result<u16, AppError> {
    let wrong = || AppError::bad_request(format!("{name} must be an integer from 1 to {MAX_SIDE}"));
    match value {
        None | Some(Value::Null) => default.ok_or_else(|| AppError::bad_request(format!("{name} is required"))),
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=u64::from(MAX_SIDE)).contains(n))
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(wrong),
    }
}

/// The program to run instead of the login shell: an absolute path (empty means none).
fn shell(raw: Option<String>) -> Result<Option<String>, AppError> {
    let Some(path) = raw.filter(|p| !p.is_empty()) else { return Ok(None) };
    if !path.starts_with('/') || path.contains('\0') || path.len() > MAX_SHELL_PATH {
        return Err(AppError::bad_request(format!(
            "shell must be an absolute path of at most {MAX_SHELL_PATH} bytes without NUL bytes"
        )));
    }
    Ok(Some(path))
}

/// `POST /api/sandboxes/{id}/pty` `{"cols","rows","shell"?}` -> 201 `{"sessionID","sandboxID"}`.
pub fn create(app: &App, raw_id: &str, request: &mut Request) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let raw = read_body(request, MAX_JSON_BODY)?;
    let body = if raw.iter().all(u8::is_ascii_whitespace) {
        CreateBody { cols: None, rows: None, shell: None }
    } else {
        parse_json(&raw)?
    };
    let mut terminal = PtyRequest {
        cols: side("cols", body.cols.as_ref(), Some(DEFAULT_SIZE.0))?,
        rows: side("rows", body.rows.as_ref(), Some(DEFAULT_SIZE.1))?,
        shell: shell(body.shell)?,
        cwd: None,
        user: None,
    };
    let (backend, record) = require_running(app, &id)?;
    // A terminal opens as its template's user, in its working directory (an image's defaults).
    let defaults = crate::templates::defaults(app, &record.template)?;
    (terminal.cwd, terminal.user) = (defaults.working_dir, defaults.user);
    let session_id = backend.runtime.pty_start(&id, &terminal).map_err(runtime_error)?;
    Ok(Reply::json(201, &json!({ "sessionID": session_id, "sandboxID": id })))
}

/// `POST /api/sandboxes/{id}/pty/{sid}/resize` `{"cols","rows"}` -> 200 `{}`.
pub fn resize(app: &App, raw_id: &str, raw_sid: &str, request: &mut Request) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let sid = exec::session_id(raw_sid)?;
    let body: ResizeBody = parse_json(&read_body(request, MAX_JSON_BODY)?)?;
    let cols = side("cols", body.cols.as_ref(), None)?;
    let rows = side("rows", body.rows.as_ref(), None)?;
    let (backend, _) = require_running(app, &id)?;
    backend.runtime.pty_resize(&id, &sid, cols, rows).map_err(runtime_error)?;
    Ok(Reply::json(200, &json!({})))
}

/// `DELETE /api/sandboxes/{id}/pty/{sid}` -> 204: SIGKILL to the terminal's processes. A
/// terminal that has already ended is what was asked for.
pub fn kill(app: &App, raw_id: &str, raw_sid: &str) -> Result<Reply, AppError> {
    let id = validate::uuid("sandbox", raw_id)?;
    let sid = exec::session_id(raw_sid)?;
    let (backend, _) = require_running(app, &id)?;
    match backend.runtime.exec_kill(&id, &sid, libc::SIGKILL) {
        Ok(()) | Err(RuntimeError::Conflict(_)) => Ok(Reply::no_content()),
        Err(e) => Err(runtime_error(e)),
    }
}

/// `GET /api/sandboxes/{id}/pty/{sid}` (or `/sandboxes/...`) with a WebSocket upgrade: the
/// terminal's bytes, raw. Returns the HTTP status that was sent.
pub fn attach_websocket(app: &App, raw_id: &str, raw_sid: &str, request: Request, listen_port: u16) -> u16 {
    exec::attach_websocket(app, raw_id, raw_sid, request, listen_port, Framing::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_are_integers_within_the_limit() {
        assert_eq!(side("cols", Some(&json!(80)), None).expect("valid"), 80);
        assert_eq!(side("cols", None, Some(80)).expect("default"), 80);
        assert_eq!(side("cols", Some(&Value::Null), Some(80)).expect("default"), 80);
        assert_eq!(side("rows", Some(&json!(1000)), None).expect("valid"), 1000);
        for bad in [json!(0), json!(1001), json!(-1), json!(24.5), json!("24"), json!(70000), json!(true)] {
            let e = side("rows", Some(&bad), Some(24)).expect_err("invalid");
            assert_eq!((e.status, e.message.as_str()), (400, "rows must be an integer from 1 to 1000"), "{bad}");
        }
        assert_eq!(side("cols", None, None).expect_err("required").message, "cols is required");
    }

    #[test]
    fn a_shell_is_an_absolute_path() {
        assert_eq!(shell(Some("/bin/zsh".into())).expect("valid"), Some("/bin/zsh".into()));
        assert_eq!(shell(Some(String::new())).expect("none"), None);
        assert!(shell(Some("zsh".into())).is_err());
        assert!(shell(Some("/bin/\0sh".into())).is_err());
    }
}
