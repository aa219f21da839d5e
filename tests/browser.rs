//! A storefront page in a real browser: `tests/browser/storefront.html`,
//! served from an origin of its own, opened in headless Chromium through
//! playwright-core (`tests/browser/run.mjs`). Without a token or an
//! identity provider it lists the catalog, starts a guest session, buys
//! and shows the order CONFIRMED live over the subscription. The same page
//! from an origin the kernel does not list gets nothing (CORS).
//!
//! Needs Debian's `chromium`, Node.js and `npm ci` in `tests/browser`
//! (`.ci/run` installs them); without them the test is reported as ignored,
//! with the reason. On failure the page's screenshot is kept in the build's
//! temporary directory (the path is in the message).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const BINARY: &str = env!("CARGO_BIN_EXE_commerce-kernel");
const PAGE: &str = include_str!("browser/storefront.html");

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/browser")
}

fn chromium() -> PathBuf {
    std::env::var_os("COMMERCE_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// Why the browser test cannot run here, if it cannot.
fn missing() -> Option<String> {
    if !chromium().is_file() {
        return Some(format!(
            "no Chromium at {} (apt-get install chromium, or set COMMERCE_CHROMIUM)",
            chromium().display()
        ));
    }
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|output| output.status.success()) {
        return Some("no Node.js".to_string());
    }
    if !browser_dir().join("node_modules/playwright-core").is_dir() {
        return Some("no playwright-core: run `npm ci` in tests/browser".to_string());
    }
    None
}

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let missing = missing();
    if let Some(reason) = &missing {
        eprintln!("the browser test is skipped: {reason}");
    }
    let trial = libtest_mimic::Trial::test(
        "a_guest_buys_in_a_real_browser_and_sees_the_order_confirmed_live",
        || a_guest_buys_in_a_real_browser().map_err(Into::into),
    )
    .with_ignored_flag(missing.is_some());
    libtest_mimic::run(&args, vec![trial]).exit()
}

/// Kills a process when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves the page for any GET on a port of its own; its origin.
fn serve_page() -> Result<String, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let origin = format!(
        "http://{}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{PAGE}",
                PAGE.len()
            );
            let _ = stream.write_all(response.as_bytes());
        }
    });
    Ok(origin)
}

/// The kernel on a fresh embedded database with the sample catalog,
/// answering browsers from `origin`; the process and its address.
fn start_kernel(data: &Path, origin: &str) -> Result<(KillOnDrop, String), String> {
    let mut child = KillOnDrop(
        Command::new(BINARY)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("COMMERCE_DATA_DIR", data)
            .env("COMMERCE_LISTEN_ADDR", "127.0.0.1:0")
            .env("COMMERCE_DEMO_CATALOG", "true")
            .env("COMMERCE_CORS_ORIGINS", origin)
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("start the kernel: {e}"))?,
    );
    let stdout = child.0.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let address = loop {
        let line = lines
            .next()
            .ok_or("the kernel stopped before it listened")?
            .map_err(|e| e.to_string())?;
        if let Some(rest) = line.split("listening on http://").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .ok_or("no address")?
                .to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok((child, address))
}

/// Runs the page in Chromium: what the page showed, or why it failed.
fn run_page(page_url: &str, screenshot: &Path) -> Result<String, String> {
    let output = Command::new("node")
        .arg(browser_dir().join("run.mjs"))
        .arg(page_url)
        .arg(screenshot)
        .arg(chromium())
        .current_dir(browser_dir())
        .output()
        .map_err(|e| format!("run node: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn a_guest_buys_in_a_real_browser() -> Result<(), String> {
    let data = tempfile::tempdir().map_err(|e| e.to_string())?;
    let shop = serve_page()?;
    let elsewhere = serve_page()?;
    let (_kernel, address) = start_kernel(data.path(), &shop)?;
    let screenshots = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));

    let shown = run_page(
        &format!("{shop}/storefront.html?kernel=http://{address}"),
        &screenshots.join("storefront-failure.png"),
    )?;
    let shown: serde_json::Value =
        serde_json::from_str(shown.trim()).map_err(|e| format!("{e}: {shown}"))?;
    if shown["status"] != "CONFIRMED" || shown["products"] != 6 {
        return Err(format!("the page showed {shown}"));
    }

    // Another origin: the browser refuses to hand the page the answers.
    let refused = run_page(
        &format!("{elsewhere}/storefront.html?kernel=http://{address}"),
        &screenshots.join("storefront-other-origin.png"),
    );
    match refused {
        Err(report) if report.contains("blocked by CORS policy") => Ok(()),
        other => Err(format!(
            "a page of an origin the kernel does not list must be refused: {other:?}"
        )),
    }
}
