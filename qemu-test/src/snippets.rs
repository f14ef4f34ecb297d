//! Documented Python examples, taken from the Markdown files that show them and run with the SDK
//! installed in its venv (sdk/python/scripts/venv.sh), so the documentation cannot drift from
//! what works.

use image::err;
use image::error::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One fenced ```python block and the heading it sits under.
#[derive(Debug, PartialEq)]
pub struct Snippet {
    pub heading: String,
    /// The file it came from, relative to the workspace.
    pub source: String,
    pub code: String,
}

/// Every ```python block of `documents` (paths relative to the workspace), in order. A block
/// shown again in a later document (the quickstart is in both READMEs) is kept once.
pub fn python_blocks(documents: &[&str]) -> Result<Vec<Snippet>> {
    let mut all: Vec<Snippet> = Vec::new();
    for doc in documents {
        let path = image::workspace::root().join(doc);
        let text = std::fs::read_to_string(&path).ctx(|| format!("read {}", path.display()))?;
        for snippet in parse_markdown(&text, doc)? {
            if !all.iter().any(|s| s.code == snippet.code) {
                all.push(snippet);
            }
        }
    }
    Ok(all)
}

fn parse_markdown(text: &str, source: &str) -> Result<Vec<Snippet>> {
    let mut found = Vec::new();
    let mut heading = String::new();
    let mut block: Option<String> = None;
    for line in text.lines() {
        match block.as_mut() {
            Some(code) if line.trim_start().starts_with("```") => {
                found.push(Snippet {
                    heading: heading.clone(),
                    source: source.to_string(),
                    code: std::mem::take(code),
                });
                block = None;
            }
            Some(code) => {
                code.push_str(line);
                code.push('\n');
            }
            None if line.trim_start() == "```python" => block = Some(String::new()),
            None if line.starts_with('#') => heading = line.trim_start_matches('#').trim().to_string(),
            None => {}
        }
    }
    match block {
        Some(_) => Err(err!("{source}: a ```python block is never closed")),
        None => Ok(found),
    }
}

/// The venv python with the SDK installed from this checkout (created on first use).
pub fn sdk_python() -> Result<PathBuf> {
    let script = image::workspace::root().join("sdk/python/scripts/venv.sh");
    let out = Command::new(&script).stderr(Stdio::inherit()).output().ctx(|| format!("run {}", script.display()))?;
    if !out.status.success() {
        return Err(err!("{} failed ({}): cannot install the SDK", script.display(), out.status));
    }
    let python = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if python.is_file() {
        Ok(python)
    } else {
        Err(err!("{} printed {python:?}, which is not a file", script.display()))
    }
}

pub struct Outcome {
    /// The exit code; `None` when killed by a signal or at the timeout.
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Writes `code` to `file` and runs it with `env`, killing it at `timeout`.
pub fn run_python(
    python: &Path,
    code: &str,
    file: &Path,
    env: &[(&str, String)],
    timeout: Duration,
) -> Result<Outcome> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(file, code).ctx(|| format!("write {}", file.display()))?;
    // Output goes to files, not pipes: a chatty example cannot block on a full pipe.
    let stdout_path = file.with_extension("stdout");
    let stderr_path = file.with_extension("stderr");
    let stdout = std::fs::File::create(&stdout_path).ctx(|| format!("create {}", stdout_path.display()))?;
    let stderr = std::fs::File::create(&stderr_path).ctx(|| format!("create {}", stderr_path.display()))?;
    let mut cmd = Command::new(python);
    cmd.arg(file).stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    for (name, value) in env {
        cmd.env(name, value);
    }
    let mut child = cmd.spawn().ctx(|| format!("run {}", python.display()))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().ctx(|| "wait for the example".into())? {
            break status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let read = |p: &Path| {
        std::fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned()).ctx(|| format!("read {}", p.display()))
    };
    Ok(Outcome { status, stdout: read(&stdout_path)?, stderr: read(&stderr_path)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end-to-end suite runs a block shown in both READMEs once; if the copies drift apart
    /// both run, and the second creates the same project again (409).
    #[test]
    fn the_quickstart_is_the_same_in_both_readmes() {
        let quickstart = |doc: &str| {
            let text = std::fs::read_to_string(image::workspace::root().join(doc)).expect("read");
            let found = parse_markdown(&text, doc).expect("parse");
            found.into_iter().find(|s| s.heading == "Quickstart").map(|s| s.code).expect("a Quickstart block")
        };
        assert_eq!(quickstart("README.md"), quickstart("sdk/python/README.md"));
    }

    #[test]
    fn blocks_are_found_under_their_headings_and_unclosed_ones_rejected() {
        let text = "# Title\n\n## Quickstart\n\n```python\nprint(1)\n```\n\n```sh\nls\n```\n### Next one\n```python\nx = 2\n\nprint(x)\n```\n";
        let found = parse_markdown(text, "doc.md").unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!((found[0].heading.as_str(), found[0].code.as_str()), ("Quickstart", "print(1)\n"));
        assert_eq!((found[1].heading.as_str(), found[1].code.as_str()), ("Next one", "x = 2\n\nprint(x)\n"));
        let err = parse_markdown("## A\n```python\nprint(1)\n", "doc.md").unwrap_err().to_string();
        assert!(err.contains("never closed"), "{err}");
        // A '#' comment inside a block is code, not a heading.
        let found = parse_markdown("## H\n```python\n# comment\n```\n", "doc.md").unwrap();
        assert_eq!((found[0].heading.as_str(), found[0].code.as_str()), ("H", "# comment\n"));
    }
}
