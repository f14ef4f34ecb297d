//! Serves a request: routes, authenticates, chooses the handler for its route and
//! method, then counts and logs the answer.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tiny_http::{Method, Request};

use crate::api::{
    checkpoints, exec, files, keys, projects, pty, sandbox_info, sandboxes, scope, secret_stores, secrets, signed_urls,
    system, templates,
};
use crate::app::App;
use crate::audit;
use crate::auth::Caller;
use crate::error::AppError;
use crate::hibernation;
use crate::http::reply::{Answered, Reply};
use crate::http::request::{header, query_param, split_url};
use crate::http::route::{match_request, Route, UNMATCHED};
use crate::url_signing::Transfer;

fn not_allowed(method: &Method, route: &Route) -> AppError {
    AppError::method_not_allowed(format!("method {method} is not allowed on {}", route.label()))
}

pub fn healthz(app: &App) -> Reply {
    Reply::json(200, &json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "kvm": app.kvm}))
}

/// Routes whose work can last as long as a command, a boot or a transfer: served on a thread
/// of their own (`http::long_work`), never on a request worker.
fn is_long(route: &Route, method: &Method) -> bool {
    use Method::{Delete, Get, Post, Put};
    matches!(
        (route, method),
        (
            Route::ExecRun(_)
                | Route::Commands(_)
                | Route::Sandboxes
                | Route::SandboxMemoryDump(_)
                | Route::SandboxRestart(_)
                | Route::SandboxHibernate(_)
                | Route::SandboxWake(_)
                | Route::Checkpoints(_)
                | Route::CheckpointRestore(..)
                | Route::FromCheckpoint(_)
                | Route::SandboxTemplate(_)
                | Route::Templates
                | Route::SystemUpgrade
                | Route::SystemMasterKeyRotate,
            Post
        ) | (Route::ExecSession(..) | Route::PtySession(..) | Route::Files(_) | Route::FilesDownload(_), Get)
            | (Route::Files(_) | Route::FilesUpload(_), Put)
            | (Route::Sandbox(_) | Route::Checkpoint(..) | Route::Template(_), Delete)
    )
}

/// Serves one request (the HTTP server's handler): answers /api/healthz without a key,
/// authenticates everything else (by its key, or a signed file URL by its signature), moves long
/// work to its own thread, hands WebSocket upgrades to `exec` and `pty` and other routes to
/// `dispatch`; counts and logs each answer.
pub fn handle(app: &Arc<App>, request: Request, port: u16) {
    let started = Instant::now();
    let url = request.url().to_string();
    let upgrade = *request.method() == Method::Get && exec::is_websocket_upgrade(&request);
    let route = match_request(split_url(&url).0, upgrade);
    if let Ok(Some(Route::Healthz)) = &route {
        return respond(app, None, request_label(&route), started, request, healthz(app));
    }
    // A signed file URL is its own authorisation (a key beside it is not looked at); a refused
    // one, like a request without a key, is counted but not audited.
    let identified = signed_urls::signed_caller(app, &route, request.method(), &url).unwrap_or_else(|| {
        let query_key = websocket_query_key(&request, &url);
        let presented = header(&request, "X-API-Key").or(query_key.as_deref().map(String::as_str));
        app.auth.identify(&app.store, presented)
    });
    let caller = match identified {
        Ok(caller) => caller,
        Err(e) => return respond(app, None, request_label(&route), started, request, Reply::error(&e)),
    };
    if let Ok(Some(r)) = &route {
        if let Err(e) = scope::authorize(app, &caller, r, request.method()) {
            return respond(app, Some(&caller), request_label(&route), started, request, Reply::error(&e));
        }
    }
    // A request that must first wake its sandbox (or wait for it to change state) is long too.
    let long = matches!(&route, Ok(Some(r)) if is_long(r, request.method())
        || r.sandbox_in_use().is_some_and(|id| hibernation::must_wait(app, id)));
    if !long {
        return serve(app, &caller, request, route, port, started);
    }
    match app.long_work.admit() {
        Ok(slot) => {
            let app = Arc::clone(app);
            slot.run("long-request", move || serve(&app, &caller, request, route, port, started));
        }
        Err(e) => respond(app, Some(&caller), request_label(&route), started, request, Reply::error(&e)),
    }
}

/// A WebSocket upgrade may carry its key as `?api_key=` (browsers cannot set headers on one),
/// as the OpenComputer SDKs send it for exec attach and terminals. Only the route label and the
/// path are ever logged or audited, never the query, so the key stays out of both.
fn websocket_query_key(request: &Request, url: &str) -> Option<zeroize::Zeroizing<String>> {
    if !exec::is_websocket_upgrade(request) {
        return None;
    }
    query_param(split_url(url).1, "api_key").ok().flatten().map(zeroize::Zeroizing::new)
}

fn request_label(route: &Result<Option<Route>, AppError>) -> &'static str {
    match route {
        Ok(Some(r)) => r.label(),
        _ => UNMATCHED,
    }
}

/// Counts, logs and audits the answer before writing it, so a client that reads /metrics or
/// the audit trail right after sees its previous request. Unauthenticated requests (no
/// `caller`) are counted but not audited: they change nothing and would let anyone fill it.
fn account(
    app: &App,
    caller: Option<&Caller>,
    (method, url): (&Method, &str),
    label: &'static str,
    started: Instant,
    status: u16,
) {
    if let Some(caller) = caller.filter(|_| audit::changes_state(method)) {
        audit::record(app, caller, method, label, split_url(url).0, status);
    }
    let elapsed = started.elapsed();
    app.metrics.record_request(label, status, elapsed);
    if app.log_requests || status >= 500 {
        // Route pattern, not the raw URL: queries may hold sandbox file paths.
        println!("appliance: {method} {label} {status} {:.1}ms", elapsed.as_secs_f64() * 1000.0);
    }
}

fn respond(app: &App, caller: Option<&Caller>, label: &'static str, started: Instant, request: Request, reply: Reply) {
    account(app, caller, (request.method(), request.url()), label, started, reply.status);
    // A client that hung up cannot be answered; nothing else to do.
    let _ = request.respond(reply.into_response());
}

/// Serves an authenticated, authorised request to its end.
fn serve(
    app: &App,
    caller: &Caller,
    mut request: Request,
    route: Result<Option<Route>, AppError>,
    port: u16,
    started: Instant,
) {
    let method = request.method().clone();
    let url = request.url().to_string();
    let (path, query) = split_url(&url);
    let label = request_label(&route);
    let upgrade = method == Method::Get && exec::is_websocket_upgrade(&request);
    // The one place a request that needs the guest finds its sandbox: a hibernated one is woken
    // first. API activity on a sandbox renews its idle timeout, and a sandbox is not idle while
    // a request works with it (a command may run longer than the timeout, a WebSocket stays
    // attached); the use ends when `in_use` drops, before the answer is written.
    let in_use = match &route {
        Ok(Some(r)) => match r.sandbox_in_use().map(|id| hibernation::awake_in_use(app, id)).transpose() {
            Ok(in_use) => in_use,
            Err(e) => return respond(app, Some(caller), label, started, request, Reply::error(&e)),
        },
        _ => None,
    };
    match route {
        Ok(Some(Route::ExecSession(id, sid))) if upgrade => {
            let status = exec::attach_websocket(app, &id, &sid, request, port, exec::Framing::Tagged);
            drop(in_use);
            account(app, Some(caller), (&method, &url), label, started, status);
        }
        Ok(Some(Route::PtySession(id, sid))) if upgrade => {
            let status = pty::attach_websocket(app, &id, &sid, request, port);
            drop(in_use);
            account(app, Some(caller), (&method, &url), label, started, status);
        }
        Ok(Some(Route::ExecRun(id) | Route::Commands(id))) if method == Method::Post => {
            let answered = exec::run(app, &id, request);
            drop(in_use);
            answered_to(app, caller, (&method, &url), label, started, answered);
        }
        Ok(Some(Route::Files(id) | Route::FilesDownload(id))) if method == Method::Get => {
            let answered = files::read(app, &id, query, request);
            drop(in_use);
            answered_to(app, caller, (&method, &url), label, started, answered);
        }
        Ok(Some(route)) => {
            let reply = dispatch(app, caller, &route, &mut request, query).unwrap_or_else(|e| Reply::error(&e));
            drop(in_use);
            respond(app, Some(caller), label, started, request, reply);
        }
        Ok(None) => {
            let reply = Reply::error(&AppError::not_found(format!("no route for {path}")));
            respond(app, Some(caller), label, started, request, reply);
        }
        Err(e) => respond(app, Some(caller), label, started, request, Reply::error(&e)),
    }
}

/// Sends (or only accounts, when it was streamed) the answer of a handler that may stream.
fn answered_to(
    app: &App,
    caller: &Caller,
    (method, url): (&Method, &str),
    label: &'static str,
    started: Instant,
    answered: Answered,
) {
    match answered {
        Answered::Reply(reply, request) => respond(app, Some(caller), label, started, *request, reply),
        Answered::Streamed(status) => account(app, Some(caller), (method, url), label, started, status),
    }
}

pub fn dispatch(
    app: &App,
    caller: &Caller,
    route: &Route,
    request: &mut Request,
    query: &str,
) -> Result<Reply, AppError> {
    let method = request.method().clone();
    use Method::{Delete, Get, Post, Put};
    match (route, &method) {
        (Route::Healthz, Get) => Ok(healthz(app)),
        (Route::Metrics, Get) => {
            let mut text = app.metrics.render(app.lifecycle.running_count());
            let mut gauges = app.lifecycle.backend().map(|b| b.runtime.resource_gauges()).unwrap_or_default();
            gauges.extend(app.capacity.gauges());
            crate::metrics::Metrics::render_gauges(&mut text, &gauges);
            if let Ok(backend) = app.lifecycle.backend() {
                crate::metrics::render_egress(&mut text, &backend.egress.snapshot());
            }
            Ok(Reply::text(200, text, "text/plain; version=0.0.4"))
        }
        (Route::Projects, Post) => projects::create(app, request),
        (Route::Projects, Get) => projects::list(app, caller),
        (Route::Project(id), Get) => projects::get(app, id),
        (Route::Project(id), Put) => projects::update(app, id, request),
        (Route::Project(id), Delete) => projects::delete(app, id),
        (Route::ProjectSecrets(id), Get) => secrets::list(app, id),
        (Route::ProjectSecret(id, name), Put) => secrets::put(app, caller, id, name, request),
        (Route::ProjectSecret(id, name), Delete) => secrets::delete(app, id, name),
        (Route::SecretStores, Post) => secret_stores::create(app, request),
        (Route::SecretStores, Get) => secret_stores::list(app, caller),
        (Route::SecretStore(id), Get) => secret_stores::get(app, id),
        (Route::SecretStore(id), Put) => secret_stores::update(app, id, request),
        (Route::SecretStore(id), Delete) => secret_stores::delete(app, id),
        (Route::SecretStoreSecrets(id), Get) => secret_stores::list_secrets(app, id),
        (Route::SecretStoreSecret(id, name), Put) => secret_stores::put_secret(app, caller, id, name, request),
        (Route::SecretStoreSecret(id, name), Delete) => secret_stores::delete_secret(app, id, name),
        (Route::Sandboxes, Post) => sandboxes::create(app, caller, request),
        (Route::Sandboxes, Get) => sandboxes::list(app, caller, query),
        (Route::Sandbox(id), Get) => sandboxes::get(app, id),
        (Route::SandboxMemoryDump(id), Post) => sandboxes::memory_dump(app, id),
        (Route::Sandbox(id), Delete) => sandboxes::delete(app, caller, id, query),
        (Route::SandboxTimeout(id), Post) => sandboxes::set_timeout(app, id, request),
        (Route::SandboxRestart(id), Post) => sandboxes::restart(app, id),
        (Route::SandboxHibernate(id), Post) => sandboxes::hibernate(app, id),
        (Route::SandboxWake(id), Post) => sandboxes::wake(app, id, request),
        (Route::Checkpoints(id), Post) => checkpoints::create(app, id, request),
        (Route::Checkpoints(id), Get) => checkpoints::list(app, id),
        (Route::Checkpoint(id, cp), Delete) => checkpoints::delete(app, id, cp),
        (Route::CheckpointRestore(id, cp), Post) => checkpoints::restore(app, id, cp),
        (Route::FromCheckpoint(cp), Post) => checkpoints::fork(app, caller, cp, request),
        (Route::SandboxTemplate(id), Post) => templates::save_sandbox(app, id, request),
        (Route::Templates, Get) => templates::list(app),
        (Route::Templates, Post) => templates::import(app, request),
        (Route::Template(name), Get) => templates::get(app, name),
        (Route::Template(name), Delete) => templates::delete(app, name),
        // Answered in `serve`, which hands the request over.
        (Route::ExecRun(_) | Route::Commands(_), Post) => Err(AppError::internal("exec/run is answered by serve")),
        (Route::ExecRunAsync(id), Post) => exec::run_async(app, id, request),
        (Route::ExecResult(id, exec_id), Get) => exec::async_result(app, id, exec_id),
        (Route::ExecSessions(id), Post) => exec::start_session(app, id, request),
        (Route::ExecSessions(id), Get) => exec::list_sessions(app, id),
        (Route::ExecKill(id, sid), Post) => exec::kill_session(app, id, sid, request),
        (Route::ExecSession(..) | Route::PtySession(..), Get) => {
            Err(AppError::bad_request("this endpoint needs a WebSocket upgrade"))
        }
        (Route::Pty(id), Post) => pty::create(app, id, request),
        (Route::PtyResize(id, sid), Post) => pty::resize(app, id, sid, request),
        (Route::PtySession(id, sid), Delete) => pty::kill(app, id, sid),
        (Route::Files(_) | Route::FilesDownload(_), Get) => Err(AppError::internal("file reads are answered by serve")),
        (Route::Files(id) | Route::FilesUpload(id), Put) => files::write(app, id, query, request),
        (Route::FilesDownloadUrl(id), Post) => signed_urls::create(app, id, Transfer::Download, request),
        (Route::FilesUploadUrl(id), Post) => signed_urls::create(app, id, Transfer::Upload, request),
        (Route::Files(id), Delete) => files::remove(app, id, query),
        (Route::FilesList(id), Get) => files::list(app, id, query),
        (Route::FilesMkdir(id), Post) => files::mkdir(app, id, query),
        (Route::FilesStat(id), Get) => files::stat(app, id, query),
        (Route::FilesRename(id), Post) => files::rename(app, id, request),
        (Route::SandboxLogs(id), Get) => sandbox_info::logs(app, id),
        (Route::SandboxAllowedHosts(id), Get) => sandbox_info::allowed_hosts(app, id),
        (Route::Unsupported(feature), _) => Err(AppError::new(501, feature.reason())),
        (Route::System, Get) => Ok(system::get(app)),
        (Route::SystemUpgrade, Post) => system::upgrade(app, request),
        (Route::SystemReboot, Post) => system::power(app, system::PowerAction::Reboot),
        (Route::SystemPoweroff, Post) => system::power(app, system::PowerAction::PowerOff),
        (Route::SystemMasterKeyRotate, Post) => system::rotate_master_key(app),
        (Route::Keys, Post) => keys::create(app, request),
        (Route::Keys, Get) => keys::list(app),
        (Route::Key(id), Delete) => keys::delete(app, id),
        (Route::Audit, Get) => Ok(Reply::json(200, &crate::audit::page(app, query)?)),
        _ => Err(not_allowed(&method, route)),
    }
}
