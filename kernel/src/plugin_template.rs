//! `commerce-kernel plugin new`: a ready-to-build guest crate for a plugin
//! kind, from the templates in `plugins/template/` and the WIT contract in
//! `wit/`, both carried in the binary so that an installed kernel can make
//! one anywhere.
//!
//! The crate is a workspace of its own with the WIT copied in, so it builds
//! outside this repository. Its manifest is parsed by the plugin host's own
//! parser before anything is written: a name the kernel would refuse to
//! install is refused here.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use commerce_plugin_host::{MANIFEST_FILE, PluginKind, PluginManifest};

/// The WIT files every plugin builds against, as this kernel has them.
const WIT: &[(&str, &str)] = &[
    ("wit/types.wit", include_str!("../../wit/types.wit")),
    ("wit/host.wit", include_str!("../../wit/host.wit")),
    ("wit/worlds.wit", include_str!("../../wit/worlds.wit")),
];

/// Files every kind shares: path in the new crate, template text.
const COMMON: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../../plugins/template/Cargo.toml"),
    ),
    (
        "README.md",
        include_str!("../../plugins/template/README.md"),
    ),
    (
        ".gitignore",
        include_str!("../../plugins/template/gitignore"),
    ),
];

/// `src/lib.rs` and `plugin.toml` of a kind.
fn kind_files(kind: PluginKind) -> [(&'static str, &'static str); 2] {
    match kind {
        PluginKind::Payment => [
            (
                "src/lib.rs",
                include_str!("../../plugins/template/payment/lib.rs"),
            ),
            (
                MANIFEST_FILE,
                include_str!("../../plugins/template/payment/plugin.toml"),
            ),
        ],
        PluginKind::Shipping => [
            (
                "src/lib.rs",
                include_str!("../../plugins/template/shipping/lib.rs"),
            ),
            (
                MANIFEST_FILE,
                include_str!("../../plugins/template/shipping/plugin.toml"),
            ),
        ],
        PluginKind::SagaStep => [
            (
                "src/lib.rs",
                include_str!("../../plugins/template/saga-step/lib.rs"),
            ),
            (
                MANIFEST_FILE,
                include_str!("../../plugins/template/saga-step/plugin.toml"),
            ),
        ],
    }
}

/// Why no crate was written.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown plugin kind {0:?}: expected payment, shipping or saga-step")]
    UnknownKind(String),
    #[error("{0:?} cannot name a plugin: use 1 to 64 of a-z, 0-9 and -, starting with a letter")]
    InvalidName(String),
    #[error("{} exists already; choose another name or folder", .0.display())]
    Exists(PathBuf),
    #[error("the template's manifest does not parse: {0}")]
    Manifest(String),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// A plugin kind as the command line and manifests name it.
pub fn parse_kind(text: &str) -> Result<PluginKind, TemplateError> {
    [
        PluginKind::Payment,
        PluginKind::Shipping,
        PluginKind::SagaStep,
    ]
    .into_iter()
    .find(|kind| kind.as_str() == text)
    .ok_or_else(|| TemplateError::UnknownKind(text.to_string()))
}

/// The file name `cargo build` gives the component of crate `name`.
pub fn component_file(name: &str) -> String {
    format!("{}.wasm", name.replace('-', "_"))
}

/// Writes the crate of plugin `name` of `kind` into `parent/name` (which
/// must not exist) and returns its folder. Nothing is written when the
/// name is refused.
pub fn create(parent: &Path, name: &str, kind: PluginKind) -> Result<PathBuf, TemplateError> {
    // The manifest's rule, and Cargo's: no package name starts with a digit.
    let valid = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'));
    if !valid {
        return Err(TemplateError::InvalidName(name.to_string()));
    }
    let component = component_file(name);
    let render = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{kind}}", kind.as_str())
            .replace("{{component}}", &component)
    };
    let files: Vec<(&str, String)> = COMMON
        .iter()
        .chain(kind_files(kind).iter())
        .map(|(path, text)| (*path, render(text)))
        .chain(WIT.iter().map(|(path, text)| (*path, text.to_string())))
        .collect();
    let manifest = files
        .iter()
        .find(|(path, _)| *path == MANIFEST_FILE)
        .map(|(_, text)| text.as_str())
        .unwrap_or_default();
    // The templates ship in this binary; this guards their edits.
    match PluginManifest::parse(manifest) {
        Ok(parsed) if parsed.name == name && parsed.kind == kind => {}
        Ok(_) => return Err(TemplateError::Manifest("name or kind differ".to_string())),
        Err(error) => return Err(TemplateError::Manifest(error.to_string())),
    }

    let root = parent.join(name);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TemplateError::Io { path, source }
    };
    // create_dir (not create_dir_all) for the root: it fails when the folder
    // exists, even when another process made it a moment ago.
    if let Err(error) = fs::create_dir(&root) {
        return Err(if error.kind() == io::ErrorKind::AlreadyExists {
            TemplateError::Exists(root)
        } else {
            io(&root)(error)
        });
    }
    for (relative, text) in &files {
        let path = root.join(relative);
        if let Some(folder) = path.parent() {
            fs::create_dir_all(folder).map_err(io(folder))?;
        }
        fs::write(&path, text).map_err(io(&path))?;
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_makes_a_crate_whose_manifest_the_host_accepts() {
        let parent = tempfile::tempdir().expect("temp dir");
        for kind in [
            PluginKind::Payment,
            PluginKind::Shipping,
            PluginKind::SagaStep,
        ] {
            let name = format!("my-{}", kind.as_str());
            let root = create(parent.path(), &name, kind).expect("created");
            let manifest = fs::read_to_string(root.join(MANIFEST_FILE)).expect("manifest written");
            let parsed = PluginManifest::parse(&manifest).expect("parses");
            assert_eq!((parsed.name.as_str(), parsed.kind), (name.as_str(), kind));
            assert_eq!(parsed.component, component_file(&name));
            let cargo = fs::read_to_string(root.join("Cargo.toml")).expect("Cargo.toml");
            assert!(cargo.contains(&format!("name = \"{name}\"")), "{cargo}");
            let lib = fs::read_to_string(root.join("src/lib.rs")).expect("lib.rs");
            assert!(!lib.contains("{{name}}") && lib.contains(&name), "{lib}");
            for (wit, text) in WIT {
                assert_eq!(fs::read_to_string(root.join(wit)).expect("wit"), *text);
            }
            // A second time, the folder exists: refused, nothing overwritten.
            fs::write(root.join("src/lib.rs"), "mine").expect("edit");
            assert!(matches!(
                create(parent.path(), &name, kind),
                Err(TemplateError::Exists(_))
            ));
            assert_eq!(
                fs::read_to_string(root.join("src/lib.rs")).expect("kept"),
                "mine"
            );
        }
    }

    #[test]
    fn names_the_kernel_or_cargo_would_refuse_are_refused_before_writing() {
        let parent = tempfile::tempdir().expect("temp dir");
        for name in [
            "",
            "9lives",
            "-x",
            "My-Plugin",
            "a/b",
            "../up",
            "a b",
            &"a".repeat(65),
        ] {
            assert!(
                matches!(
                    create(parent.path(), name, PluginKind::Payment),
                    Err(TemplateError::InvalidName(_))
                ),
                "{name:?} was accepted"
            );
        }
        assert_eq!(fs::read_dir(parent.path()).expect("read").count(), 0);
        assert!(matches!(
            parse_kind("refund"),
            Err(TemplateError::UnknownKind(_))
        ));
        assert_eq!(parse_kind("saga-step").expect("kind"), PluginKind::SagaStep);
    }
}
