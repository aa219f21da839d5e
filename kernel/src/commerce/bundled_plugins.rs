//! The plugins the kernel binary carries, so a fresh shop completes its
//! first order without a payment service or a carrier: `manual-payment` as
//! the saga's `payment` plugin, `flat-rate-shipping` as its `shipping`
//! plugin, and the `order-limit` step for `defineSaga` to insert.
//!
//! They are ordinary components, built from `plugins/guests` and committed
//! in `plugins/defaults` (so `cargo run` needs no `wasm32-wasip2` target);
//! `tests/bundled_plugins.rs` rebuilds them and requires the same bytes.
//! Every kernel process writes them into its plugin directory when it
//! starts ([`Plugins::place_bundled`](super::plugins::Plugins::place_bundled)),
//! so any process can load a bundled version the log names; only a database
//! where no admin ever activated a payment or shipping plugin gets them
//! activated ([`Plugins::activate_defaults`](super::plugins::Plugins::activate_defaults)),
//! by default only the embedded one (`COMMERCE_DEFAULT_PLUGINS`): the manual
//! payment plugin takes no money.
//!
//! A change to a component's bytes needs a new version here: a version is
//! written once, and a directory that holds the old bytes under the same
//! version refuses the new ones.

use commerce_plugin_host::{PluginKind, sha256_hex};

/// One plugin version inside the binary.
#[derive(Debug)]
pub struct BundledPlugin {
    /// The name the saga calls it by.
    pub name: &'static str,
    /// Its version; a changed component needs a new one.
    pub version: &'static str,
    /// The contract it implements.
    pub kind: PluginKind,
    /// The component's file name in the plugin directory.
    pub file: &'static str,
    /// The component itself, from `plugins/defaults`.
    pub component: &'static [u8],
    /// The manifest after its pinned fields: limits and `[config]`.
    pub settings: &'static str,
    /// Activated on a fresh database; otherwise only installed.
    pub active_by_default: bool,
}

impl BundledPlugin {
    /// Its `plugin.toml`, pinning the component's sha256.
    pub fn manifest(&self) -> String {
        format!(
            "name = \"{}\"\nversion = \"{}\"\nkind = \"{}\"\ncomponent = \"{}\"\nsha256 = \"{}\"\n{}",
            self.name,
            self.version,
            self.kind,
            self.file,
            sha256_hex(self.component),
            self.settings
        )
    }
}

/// `manual-payment` as `payment`: accepts every payment at once and moves
/// no money; the payment method `test_decline` is declined and
/// `test_unavailable` fails as a provider that is down.
pub const MANUAL_PAYMENT: BundledPlugin = BundledPlugin {
    name: "payment",
    version: "1.0.0+manual",
    kind: PluginKind::Payment,
    file: "manual_payment.wasm",
    component: include_bytes!("../../../plugins/defaults/manual_payment.wasm"),
    settings: "",
    active_by_default: true,
};

/// `flat-rate-shipping` as `shipping`, service `standard`, to the
/// destinations these rates cover. The kernel does not add the rate to the
/// order's total yet: nothing calls `quote`.
pub const FLAT_RATE_SHIPPING: BundledPlugin = BundledPlugin {
    name: "shipping",
    version: "1.0.0+flat-rate",
    kind: PluginKind::Shipping,
    file: "flat_rate_shipping.wasm",
    component: include_bytes!("../../../plugins/defaults/flat_rate_shipping.wasm"),
    settings: "[config]\n\
               rates = \"DE:EUR=4.90, *:EUR=9.90, US:USD=6.90, *:USD=14.90, GB:GBP=4.50, *:GBP=12.00\"\n\
               service = \"standard\"\n\
               estimated_days = \"3\"\n",
    active_by_default: true,
};

/// The `order-limit` step (refuses orders above 10,000 in their currency or
/// 100 items), installed for `defineSaga` to name, never activated by itself.
pub const ORDER_LIMIT: BundledPlugin = BundledPlugin {
    name: "order-limit",
    version: "1.0.0",
    kind: PluginKind::SagaStep,
    file: "order_limit.wasm",
    component: include_bytes!("../../../plugins/defaults/order_limit.wasm"),
    settings: "",
    active_by_default: false,
};

/// Every bundled plugin.
pub const BUNDLED: [&BundledPlugin; 3] = [&MANUAL_PAYMENT, &FLAT_RATE_SHIPPING, &ORDER_LIMIT];
