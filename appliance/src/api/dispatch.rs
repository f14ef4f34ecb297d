//! Serves a request: routes, authenticates, chooses the handler for its route and
//! method, then counts and logs the answer.

use std::time::Instant;

use serde_json::json;
use tiny_http::{Method, Request};

use crate::api::{exec, files, projects, sandboxes, secrets, system};
use crate::app::App;
use crate::error::AppError;
use crate::http::reply::Reply;
use crate::http::request::{header, split_url};
use crate::http::route::{match_route, Route, UNMATCHED};

fn not_allowed(method: &Method, route: &Route) -> AppError {
    AppError::method_not_allowed(format!("method {method} is not allowed on {}", route.label()))
}

pub fn healthz(app: &App) -> Reply {
    Reply::json(200, &json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "kvm": app.kvm}))
}

/// Serves one request (the HTTP server's handler): answers /api/healthz without a key,
/// authenticates everything else, hands exec WebSocket upgrades to `exec` and other
/// routes to `dispatch`; counts and logs each answer.
pub fn handle(app: &App, mut request: Request, port: u16) {
    let started = Instant::now();
    let method = request.method().clone();
    let url = request.url().to_string();
    let (path, query) = split_url(&url);
    let route = match_route(path);
    let label = match &route {
        Ok(Some(r)) => r.label(),
        _ => UNMATCHED,
    };
    // Counted and logged before the answer is written, so a client that reads
    // /metrics right after sees its previous request.
    let account = |status: u16| {
        let elapsed = started.elapsed();
        app.metrics.record_request(label, status, elapsed);
        if app.log_requests || status >= 500 {
            // Route pattern, not the raw URL: queries may hold sandbox file paths.
            println!("appliance: {method} {label} {status} {:.1}ms", elapsed.as_secs_f64() * 1000.0);
        }
    };
    let respond = |request: Request, reply: Reply| {
        account(reply.status);
        // A client that hung up cannot be answered; nothing else to do.
        let _ = request.respond(reply.into_response());
    };

    if let Ok(Some(Route::Healthz)) = &route {
        return respond(request, healthz(app));
    }
    if let Err(e) = app.auth.check(header(&request, "X-API-Key")) {
        return respond(request, Reply::error(&e));
    }
    match route {
        Ok(Some(Route::ExecSession(id, sid))) if method == Method::Get && exec::is_websocket_upgrade(&request) => {
            let status = exec::attach_websocket(app, &id, &sid, request, port);
            account(status);
        }
        Ok(Some(route)) => {
            let reply = dispatch(app, &route, &mut request, query).unwrap_or_else(|e| Reply::error(&e));
            respond(request, reply);
        }
        Ok(None) => respond(request, Reply::error(&AppError::not_found(format!("no route for {path}")))),
        Err(e) => respond(request, Reply::error(&e)),
    }
}

pub fn dispatch(app: &App, route: &Route, request: &mut Request, query: &str) -> Result<Reply, AppError> {
    let method = request.method().clone();
    use Method::{Delete, Get, Post, Put};
    match (route, &method) {
        (Route::Healthz, Get) => Ok(healthz(app)),
        (Route::Metrics, Get) => {
            let mut text = app.metrics.render(app.lifecycle.running_count());
            let gauges = app.lifecycle.backend().map(|b| b.runtime.resource_gauges()).unwrap_or_default();
            crate::metrics::Metrics::render_gauges(&mut text, &gauges);
            if let Ok(backend) = app.lifecycle.backend() {
                crate::metrics::render_egress(&mut text, &backend.egress.snapshot());
            }
            Ok(Reply::text(200, text, "text/plain; version=0.0.4"))
        }
        (Route::Projects, Post) => projects::create(app, request),
        (Route::Projects, Get) => projects::list(app),
        (Route::Project(id), Get) => projects::get(app, id),
        (Route::Project(id), Put) => projects::update(app, id, request),
        (Route::Project(id), Delete) => projects::delete(app, id),
        (Route::ProjectSecrets(id), Get) => secrets::list(app, id),
        (Route::ProjectSecret(id, name), Put) => secrets::put(app, id, name, request),
        (Route::ProjectSecret(id, name), Delete) => secrets::delete(app, id, name),
        (Route::Sandboxes, Post) => sandboxes::create(app, request),
        (Route::Sandboxes, Get) => sandboxes::list(app),
        (Route::Sandbox(id), Get) => sandboxes::get(app, id),
        (Route::SandboxMemoryDump(id), Post) => sandboxes::memory_dump(app, id),
        (Route::Sandbox(id), Delete) => sandboxes::delete(app, id),
        (Route::SandboxTimeout(id), Post) => sandboxes::set_timeout(app, id, request),
        (Route::ExecRun(id) | Route::Commands(id), Post) => exec::run(app, id, request),
        (Route::ExecSessions(id), Post) => exec::start_session(app, id, request),
        (Route::ExecSessions(id), Get) => exec::list_sessions(app, id),
        (Route::ExecKill(id, sid), Post) => exec::kill_session(app, id, sid, request),
        (Route::ExecSession(..), Get) => Err(AppError::bad_request("this endpoint needs a WebSocket upgrade")),
        (Route::Files(id), Get) => files::read(app, id, query),
        (Route::Files(id), Put) => files::write(app, id, query, request),
        (Route::Files(id), Delete) => files::remove(app, id, query),
        (Route::FilesList(id), Get) => files::list(app, id, query),
        (Route::FilesMkdir(id), Post) => files::mkdir(app, id, query),
        (Route::System, Get) => Ok(system::get()),
        (Route::SystemUpgrade, Post) => system::upgrade(app, request),
        (Route::SystemReboot, Post) => system::power(app, system::PowerAction::Reboot),
        (Route::SystemPoweroff, Post) => system::power(app, system::PowerAction::PowerOff),
        _ => Err(not_allowed(&method, route)),
    }
}
