//! Builds the guest plugins in `../guests` as `wasm32-wasip2` components and
//! writes their paths to `$OUT_DIR/components.rs`, as wasmtime's
//! test-programs crate does, so `cargo test` needs no manual step.
//!
//! A plain `cargo build` does not install a missing target even when
//! `rust-toolchain.toml` names it, so this script adds `wasm32-wasip2` with
//! rustup when it is missing, and otherwise stops with the command to run.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

/// Guest crate name, and the constant naming its component in `lib.rs`.
const GUESTS: &[(&str, &str)] = &[
    ("order-limit", "ORDER_LIMIT"),
    ("misbehaving", "MISBEHAVING"),
    ("payment-http", "PAYMENT_HTTP"),
    ("shipping-http", "SHIPPING_HTTP"),
    ("manual-payment", "MANUAL_PAYMENT"),
    ("flat-rate-shipping", "FLAT_RATE_SHIPPING"),
];

fn main() {
    if let Err(message) = build() {
        // A build script reports failure by exiting non-zero; the message is
        // what the developer sees.
        eprintln!("{message}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let guests = manifest_dir.join("../guests");
    let wit = manifest_dir.join("../../wit");
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", guests.display());
    println!("cargo:rerun-if-changed={}", wit.display());

    ensure_target()?;

    // Beside the kernel's own build output (<target>/<profile>/plugin-guests),
    // so a change to this script's hash does not rebuild the guests from scratch.
    let guest_target = out_dir
        .ancestors()
        .nth(3)
        .map(|profile_dir| profile_dir.join("plugin-guests"))
        .unwrap_or_else(|| out_dir.join("plugin-guests"));

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--release")
        .arg("--target")
        .arg(TARGET)
        .arg("--manifest-path")
        .arg(guests.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&guest_target);
    // The outer build's flags, wrappers, lints and profile settings are for
    // the host, not the guests (whose profile is their workspace's own).
    let profile_settings: Vec<std::ffi::OsString> = env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| name.to_string_lossy().starts_with("CARGO_PROFILE_"))
        .collect();
    for variable in profile_settings {
        command.env_remove(variable);
    }
    for variable in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CLIPPY_ARGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        command.env_remove(variable);
    }
    // The same sources must give the same bytes on every machine: the
    // kernel ships some of these components (plugins/defaults), and a test
    // compares them with this build. Paths end up in panic messages, so
    // the checkout's and cargo's own are written as fixed prefixes.
    command.env("CARGO_ENCODED_RUSTFLAGS", remapped_paths(&guests)?);
    let output = command
        .output()
        .map_err(|error| format!("could not run cargo to build the guest plugins: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the guest plugins in {} failed:\n{}",
            guests.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }

    let mut source = String::new();
    for (crate_name, constant) in GUESTS {
        let file = guest_target
            .join(TARGET)
            .join("release")
            .join(format!("{}.wasm", crate_name.replace('-', "_")));
        if !file.is_file() {
            return Err(format!("the guest build produced no {}", file.display()));
        }
        writeln!(
            source,
            "/// The `{crate_name}` component, built from `plugins/guests/{crate_name}`.\n\
             pub const {constant}: &str = {:?};",
            file.display().to_string()
        )
        .map_err(|error| error.to_string())?;
    }
    fs::write(out_dir.join("components.rs"), source)
        .map_err(|error| format!("could not write components.rs: {error}"))
}

/// `--remap-path-prefix` flags (in cargo's encoding, separated by 0x1f)
/// that turn the guests' folder into `/guests` and cargo's home (where
/// dependencies' sources are) into `/cargo`, each as given and as resolved
/// (a symlinked home or checkout reaches rustc either way).
fn remapped_paths(guests: &Path) -> Result<String, String> {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")));
    let mut flags = Vec::new();
    let mut remap = |path: &Path, to: &str| {
        for form in [Some(path.to_path_buf()), fs::canonicalize(path).ok()]
            .into_iter()
            .flatten()
        {
            let flag = format!("--remap-path-prefix={}={to}", form.display());
            if !flags.contains(&flag) {
                flags.push(flag);
            }
        }
    };
    remap(guests, "/guests");
    if let Some(cargo_home) = &cargo_home {
        remap(cargo_home, "/cargo");
    }
    Ok(flags.join("\u{1f}"))
}

/// Makes sure the toolchain has the standard library for `wasm32-wasip2`.
fn ensure_target() -> Result<(), String> {
    if target_installed()? {
        return Ok(());
    }
    println!("cargo:warning=installing the {TARGET} target with rustup (the plugins need it)");
    let added = Command::new("rustup")
        .args(["target", "add", TARGET])
        .status();
    match added {
        Ok(status) if status.success() && target_installed()? => Ok(()),
        _ => Err(format!(
            "the guest plugins need the {TARGET} target, which this toolchain lacks and \
             rustup could not add. Run `rustup target add {TARGET}` in this repository, \
             then build again."
        )),
    }
}

fn target_installed() -> Result<bool, String> {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let output = Command::new(rustc)
        .args(["--print", "target-libdir", "--target", TARGET])
        .output()
        .map_err(|error| format!("could not run rustc: {error}"))?;
    let libdir = String::from_utf8_lossy(&output.stdout).trim().to_string();
    Ok(output.status.success() && has_core_rlib(Path::new(&libdir)))
}

/// The standard library's file names carry a hash: `libcore-<hash>.rlib`.
fn has_core_rlib(libdir: &Path) -> bool {
    fs::read_dir(libdir)
        .map(|entries| {
            entries.flatten().any(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                name.starts_with("libcore-") && name.ends_with(".rlib")
            })
        })
        .unwrap_or(false)
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("cargo did not set {name}"))
}
