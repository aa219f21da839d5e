//! The WIT package in `wit/` parses and defines the worlds plugins are built
//! against. (The host binds them with wasmtime once it lands; until then this
//! guards the contract's syntax and shape.)

use std::path::Path;

use wit_parser::{Resolve, WorldItem, WorldKey};

fn package() -> (Resolve, wit_parser::PackageId) {
    let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
    let mut resolve = Resolve::default();
    let (package, _) = resolve
        .push_dir(&wit)
        .unwrap_or_else(|error| panic!("wit/ does not parse: {error:#}"));
    (resolve, package)
}

/// The interface names a world imports and exports.
fn world_items(
    resolve: &Resolve,
    package: wit_parser::PackageId,
    world: &str,
) -> (Vec<String>, Vec<String>) {
    let id = resolve.packages[package].worlds[world];
    let names = |items: &indexmap::IndexMap<WorldKey, WorldItem>| -> Vec<String> {
        let mut names: Vec<String> = items
            .iter()
            .filter_map(|(key, item)| match item {
                WorldItem::Interface { id, .. } => {
                    resolve.interfaces[*id].name.clone().or(match key {
                        WorldKey::Name(name) => Some(name.clone()),
                        WorldKey::Interface(_) => None,
                    })
                }
                _ => None,
            })
            .collect();
        names.sort();
        names
    };
    let world = &resolve.worlds[id];
    (names(&world.imports), names(&world.exports))
}

#[test]
fn the_package_is_versioned() {
    let (resolve, package) = package();
    assert_eq!(
        resolve.packages[package].name.to_string(),
        "commerce:plugin@0.2.0"
    );
}

#[test]
fn each_plugin_kind_has_its_world() {
    let (resolve, package) = package();
    let expect = |world: &str, imports: &[&str], exports: &[&str]| {
        let (found_imports, found_exports) = world_items(&resolve, package, world);
        // `types` comes in with the interfaces that use it.
        let found_imports: Vec<String> = found_imports
            .into_iter()
            .filter(|name| name != "types")
            .collect();
        assert_eq!(found_imports, imports, "{world} imports");
        assert_eq!(found_exports, exports, "{world} exports");
    };
    expect("payment-plugin", &["config", "log"], &["payment-provider"]);
    expect(
        "shipping-plugin",
        &["config", "log"],
        &["shipping-provider"],
    );
    expect("saga-step-plugin", &[], &["saga-step"]);
    expect(
        "saga-step-plugin-with-host",
        &["config", "log"],
        &["saga-step"],
    );
}

#[test]
fn every_write_takes_an_idempotency_key() {
    let (resolve, package) = package();
    let writes = [
        (
            "payment-provider",
            ["capture", "refund", "cancel"].as_slice(),
        ),
        (
            "shipping-provider",
            ["create-shipment", "cancel-shipment"].as_slice(),
        ),
    ];
    for (interface, functions) in writes {
        let id = resolve.packages[package].interfaces[interface];
        for function in functions {
            let params = &resolve.interfaces[id].functions[*function].params;
            assert_eq!(params[0].name, "idempotency-key", "{interface}.{function}");
        }
    }
}
