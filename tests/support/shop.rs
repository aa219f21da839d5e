//! A shop set up through GraphQL as an admin would: the payment and
//! shipping plugins installed against fake providers, a saga definition with
//! test-sized retries, and a product in stock.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::ensure;

use super::fakes::{FakePayments, FakeShipping};
use serde_json::{Value, json};
use uuid::Uuid;

/// A kernel the shop can be set up on.
pub trait AdminClient {
    /// Runs a query as an admin; the whole response.
    fn admin_graphql(
        &self,
        query: &str,
        variables: Value,
    ) -> impl Future<Output = anyhow::Result<Value>> + Send;

    /// Runs a mutation as an admin; its payload, which must have no errors.
    fn mutate(
        &self,
        field: &str,
        query: &str,
        variables: Value,
    ) -> impl Future<Output = anyhow::Result<Value>> + Send
    where
        Self: Sync,
    {
        async move {
            let body = self.admin_graphql(query, variables).await?;
            let payload = body["data"][field].clone();
            ensure!(payload["errors"] == json!([]), "{field}: {body}");
            Ok(payload)
        }
    }
}

/// An `installPlugin` input for the component at `path`.
pub fn upload(name: &str, kind: &str, path: &str, extra: &str) -> anyhow::Result<Value> {
    use base64::Engine as _;
    let bytes = std::fs::read(path)?;
    let manifest = format!(
        "name = \"{name}\"\nversion = \"1.0.0\"\nkind = \"{kind}\"\n\
         component = \"{name}.wasm\"\nsha256 = \"{}\"\n{extra}\n",
        commerce_plugin_host::sha256_hex(&bytes)
    );
    Ok(json!({
        "manifest": manifest,
        "component": base64::engine::general_purpose::STANDARD.encode(&bytes),
    }))
}

/// A provider the plugins call: its base URL and address.
pub struct Provider {
    pub base_url: String,
    pub address: SocketAddr,
}

/// Retries sized for tests.
pub const RETRY: &str =
    "{ maxAttempts: 4, initialBackoffMs: 50, maxBackoffMs: 200, timeoutMs: 2000 }";

/// Installs and activates `payment` and `shipping` against the providers,
/// defines the fulfilment saga with [`RETRY`], and creates a product with
/// `stock` units; the product's id.
pub async fn set_up(
    admin: &(impl AdminClient + Sync),
    payments: Provider,
    shipping: Provider,
    stock: i64,
) -> anyhow::Result<Uuid> {
    let grant = |provider: &Provider| {
        format!(
            "allowed_hosts = [\"{}\"]\n[config]\nbase_url = \"{}\"",
            provider.address, provider.base_url
        )
    };
    for (name, path, provider) in [
        (
            "payment",
            commerce_plugin_artifacts::PAYMENT_HTTP,
            &payments,
        ),
        (
            "shipping",
            commerce_plugin_artifacts::SHIPPING_HTTP,
            &shipping,
        ),
    ] {
        admin
            .mutate(
                "installPlugin",
                "mutation ($input: InstallPluginInput!) { installPlugin(input: $input) { errors { field code message } } }",
                json!({ "input": upload(name, name, path, &grant(provider))? }),
            )
            .await?;
        admin
            .mutate(
                "activatePlugin",
                "mutation ($name: String!) { activatePlugin(input: { name: $name, version: \"1.0.0\" }) { errors { code message } } }",
                json!({ "name": name }),
            )
            .await?;
    }
    define_saga(admin).await?;
    stocked_product(admin, stock).await
}

/// Defines the fulfilment saga with the built-in steps, the plugins
/// `payment` and `shipping`, and [`RETRY`] everywhere.
pub async fn define_saga(admin: &(impl AdminClient + Sync)) -> anyhow::Result<()> {
    let define = format!(
        "mutation {{ defineSaga(input: {{ timeoutMs: 60000, compensationRetry: {RETRY}, steps: [
            {{ name: \"reserve-inventory\", kind: RESERVE_INVENTORY, retry: {RETRY} }},
            {{ name: \"payment\", kind: PAYMENT, plugin: \"payment\", retry: {RETRY} }},
            {{ name: \"shipment\", kind: SHIPMENT, plugin: \"shipping\", retry: {RETRY} }},
            {{ name: \"confirm\", kind: CONFIRM, retry: {RETRY} }} ] }})
          {{ definition {{ revision }} errors {{ field code message }} }} }}"
    );
    admin.mutate("defineSaga", &define, json!({})).await?;
    Ok(())
}

/// A new product (19.90 EUR) with `stock` units; its id.
pub async fn stocked_product(
    admin: &(impl AdminClient + Sync),
    stock: i64,
) -> anyhow::Result<Uuid> {
    let created = admin
        .mutate(
            "createProduct",
            "mutation ($sku: String!) { createProduct(input: { sku: $sku, name: \"Teapot\", price: { amount: \"19.90\", currency: \"EUR\" } }) { product { id } errors { code message } } }",
            json!({ "sku": format!("SKU-{}", Uuid::now_v7().simple()) }),
        )
        .await?;
    let product: Uuid = serde_json::from_value(created["product"]["id"].clone())?;
    admin
        .mutate(
            "adjustInventory",
            "mutation ($id: UUID!, $delta: Int!) { adjustInventory(input: { productId: $id, delta: $delta, reason: \"stock\" }) { errors { code message } } }",
            json!({ "id": product, "delta": stock }),
        )
        .await?;
    Ok(product)
}

/// `placeOrder`'s shipping address, to a country.
pub fn address(country: &str) -> Value {
    json!({ "name": "Ada", "line1": "1 Main St", "city": "Berlin", "postalCode": "10115", "country": country })
}

/// Fake providers, the plugins installed against them, and a product.
pub struct Shop {
    pub payments: FakePayments,
    pub shipping: FakeShipping,
    pub product: Uuid,
}

/// Starts the fake providers and [`set_up`]s the shop against them.
pub async fn open(admin: &(impl AdminClient + Sync), stock: i64) -> anyhow::Result<Shop> {
    let payments = FakePayments::start().await;
    let shipping = FakeShipping::start().await;
    let product = set_up(
        admin,
        Provider {
            base_url: payments.base_url(),
            address: payments.address,
        },
        Provider {
            base_url: shipping.base_url(),
            address: shipping.address,
        },
        stock,
    )
    .await?;
    Ok(Shop {
        payments,
        shipping,
        product,
    })
}
