//! The backend for `log` records (the sealing proxy's egress records and warnings): one
//! line each on the appliance's console, next to its own `appliance: ...` lines. Debug
//! and trace records are dropped. As a last guard, any sealed token in a line is shown
//! by its prefix only: the console is an operator's log, and tokens are per-sandbox
//! credentials of a kind.

use std::io::Write;

struct ConsoleLog;

static CONSOLE_LOG: ConsoleLog = ConsoleLog;

impl log::Log for ConsoleLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let component = record.target().split("::").next().unwrap_or("log");
        let line = redact_tokens(&format!("{component}: {}", record.args()));
        // One write per line, so lines from several threads do not interleave.
        let _ = std::io::stdout().lock().write_all(format!("{line}\n").as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stdout().flush();
    }
}

/// Installs the backend (once; later calls change nothing).
pub fn install() {
    if log::set_logger(&CONSOLE_LOG).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// `text` with every sealed token cut to its prefix.
fn redact_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(sealed_token::PREFIX) {
        let after = &rest[i + sealed_token::PREFIX.len()..];
        let hex = after.bytes().take_while(u8::is_ascii_hexdigit).count();
        out.push_str(&rest[..i]);
        out.push_str(sealed_token::PREFIX);
        if hex > 0 {
            out.push_str("<redacted>");
        }
        rest = &after[hex..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_cut_to_their_prefix() {
        let t = "osb_sealed_0123456789abcdef0123456789abcdef";
        assert_eq!(
            redact_tokens(&format!("host {t}.evil.test and {t}")),
            "host osb_sealed_<redacted>.evil.test and osb_sealed_<redacted>"
        );
        assert_eq!(redact_tokens("no token here; osb_sealed_ alone"), "no token here; osb_sealed_ alone");
    }
}
