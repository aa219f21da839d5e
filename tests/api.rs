//! The GraphQL API as frontends meet it: authentication (HS256 and RS256
//! through a JWKS), what each role may reach, live order updates over both
//! WebSocket protocols (resumed, and across kernel processes), the request
//! limits, and hostile input. Runs on every backend (see support/mod.rs).

#[macro_use]
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use commerce_kernel::api::guests::GuestSessions;
use commerce_kernel::api::{Adapters, build_schema};
use commerce_kernel::auth::Principal;
use commerce_kernel::carts::embedded::EmbeddedCartStore;
use commerce_kernel::commerce::{
    Carts, CommandContext, Commerce, NewProduct, PlaceOrderInput, Plugins, Sagas,
};
use commerce_kernel::config::{self, GraphqlLimits};
use commerce_kernel::domain::cart::CartLimits;
use commerce_kernel::domain::money::{Currency, Money};
use commerce_kernel::domain::order::Address;
use commerce_kernel::domain::saga::{ORDER_FULFILMENT, Saga};
use commerce_kernel::event_store::{
    AppendRequest, EventFilter, EventStore as _, NewEvent, Position, StreamSelection,
};
use commerce_kernel::live::LiveUpdates;
use commerce_kernel::projections::Projector;
use commerce_plugin_host::{EngineConfig, PluginRegistry};
use futures_util::SinkExt as _;
use serde_json::{Value, json};
use support::counting::{CountingEvents, CountingViews};
use support::kernel::{RunningKernel, TEST_JWT_SECRET, error_code, payload_codes};
use support::shop::{self, AdminClient as _};
use support::socket::{Frame, Protocol, Socket};
use support::traces;
use support::{TestDatabase, run_suite_except, wait_until_readable};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

fn main() {
    run_suite_except(
        &cases![
            requests_without_a_valid_token_are_refused,
            rs256_tokens_are_checked_against_the_jwks,
            customers_reach_only_their_own_carts_and_orders,
            without_a_token_only_the_catalog_and_guest_sessions_answer,
            an_order_is_watched_live_to_confirmed_and_resumed_without_gaps,
            subscribers_see_orders_placed_on_another_kernel,
            every_limit_is_configurable_and_enforced,
            bad_input_is_refused_with_its_field_named,
            hostile_documents_and_bodies_never_break_the_server,
            customers_see_no_internal_references_in_their_orders,
            a_page_of_nested_fields_costs_a_bounded_number_of_reads,
            an_update_committed_behind_an_open_transaction_arrives_once_the_log_shows_it,
            metrics_show_an_order_from_cart_to_confirmed,
            kpis_report_the_orders_and_carts_of_a_range,
            metrics_are_served_where_configured_and_to_the_token_only,
            one_trace_follows_an_order_to_the_providers,
            inventory_reconciliation_finds_injected_drift_and_repairs_it,
            prune_store_deletes_only_what_is_old_enough,
            overdue_sagas_are_listed_and_compensated_in_bulk,
            a_periodic_check_runs_on_one_process_per_interval,
        ],
        // SQLite has one writer: nothing commits behind an open transaction.
        &["an_update_committed_behind_an_open_transaction_arrives_once_the_log_shows_it"],
    );
}

/// An HS256 token with exactly these claims, signed with `secret`.
fn signed(secret: &str, claims: Value) -> anyhow::Result<String> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn requests_without_a_valid_token_are_refused(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let query = "{ orders { totalCount } }";
    let claims = |sub: &str, roles: Value, exp: i64| json!({ "sub": sub, "roles": roles, "iss": "commerce-kernel", "aud": "commerce-kernel", "exp": exp });
    let customer = Uuid::now_v7().to_string();
    let refused = [
        ("no token", None),
        (
            "another secret",
            Some(signed(
                "another-secret-another-secret-xx",
                claims("ops", json!(["admin"]), now() + 60),
            )?),
        ),
        (
            "expired",
            Some(signed(
                TEST_JWT_SECRET,
                claims("ops", json!(["admin"]), now() - 600),
            )?),
        ),
        (
            "wrong audience",
            Some(signed(
                TEST_JWT_SECRET,
                json!({ "sub": "ops", "roles": ["admin"], "iss": "commerce-kernel", "aud": "elsewhere", "exp": now() + 60 }),
            )?),
        ),
        (
            "no issuer",
            Some(signed(
                TEST_JWT_SECRET,
                json!({ "sub": "ops", "roles": ["admin"], "aud": "commerce-kernel", "exp": now() + 60 }),
            )?),
        ),
        (
            "a subject with a control character",
            Some(signed(
                TEST_JWT_SECRET,
                claims("bo\u{7}b", json!(["customer"]), now() + 60),
            )?),
        ),
        ("garbage", Some("not.a.token".to_string())),
    ];
    for (what, token) in refused {
        let response = kernel
            .http
            .post(kernel.url("/graphql"))
            .json(&json!({ "query": query }));
        let response = match &token {
            Some(token) => response.bearer_auth(token),
            None => response,
        }
        .send()
        .await?;
        ensure!(response.status() == 401, "{what}: {}", response.status());
        ensure!(
            response
                .headers()
                .get("www-authenticate")
                .is_some_and(|v| v.to_str().unwrap_or_default().starts_with("Bearer")),
            "{what}: no WWW-Authenticate"
        );
        let body: Value = response.json().await?;
        ensure!(
            error_code(&body) == Some("UNAUTHENTICATED"),
            "{what}: {body}"
        );
    }
    // Signed and valid, but granting no role the kernel knows.
    let no_role = signed(
        TEST_JWT_SECRET,
        claims(&customer, json!(["viewer"]), now() + 60),
    )?;
    let (status, body) = kernel.graphql_as(Some(&no_role), query, json!({})).await?;
    ensure!(
        status == 403 && error_code(&body) == Some("FORBIDDEN"),
        "{status} {body}"
    );
    // The same request with a good token goes through.
    let good = signed(
        TEST_JWT_SECRET,
        claims(&customer, json!(["customer"]), now() + 60),
    )?;
    let (status, body) = kernel.graphql_as(Some(&good), query, json!({})).await?;
    ensure!(
        status == 200 && body["data"]["orders"]["totalCount"] == 0,
        "{body}"
    );

    // A WebSocket without a token in connection_init is closed.
    for protocol in [Protocol::TransportWs, Protocol::LegacyWs] {
        let refused = Socket::connect(&kernel, protocol, json!({})).await?;
        ensure!(
            refused.is_err(),
            "{protocol:?}: a socket without a token was accepted"
        );
        let refused = Socket::connect(&kernel, protocol, json!({ "token": "not.a.token" })).await?;
        ensure!(
            refused.is_err(),
            "{protocol:?}: a socket with a bad token was accepted"
        );
    }
    kernel.stop().await
}

/// A JWKS served on a loopback port, as an identity provider would.
async fn serve_jwks() -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    let jwks: Value = serde_json::from_str(include_str!("fixtures/jwks.json"))?;
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/.well-known/jwks.json", listener.local_addr()?);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, server))
}

async fn rs256_tokens_are_checked_against_the_jwks(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let (url, idp) = serve_jwks().await?;
    let kernel = RunningKernel::start(
        &db,
        &[
            (config::JWKS_URL, &url),
            (config::JWT_SECRET, ""),
            (config::JWT_ISSUER, "https://idp.test/"),
            (config::JWT_AUDIENCE, "shop"),
        ],
    )
    .await?;
    let key = EncodingKey::from_rsa_pem(include_bytes!("fixtures/jwt-rs256-private.pem"))?;
    let claims = json!({ "sub": "ops", "roles": ["admin"], "iss": "https://idp.test/", "aud": ["shop"], "exp": now() + 60 });
    let sign = |kid: Option<&str>| {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, &claims, &key)
    };
    let query = "{ eventLogHead }";
    let (status, body) = kernel
        .graphql_as(Some(&sign(Some("test-key-1"))?), query, json!({}))
        .await?;
    ensure!(
        status == 200 && body["data"]["eventLogHead"].is_string(),
        "{status} {body}"
    );
    // One key in the set: a token without kid uses it.
    let (status, _) = kernel
        .graphql_as(Some(&sign(None)?), query, json!({}))
        .await?;
    ensure!(status == 200, "no kid: {status}");
    let (status, body) = kernel
        .graphql_as(Some(&sign(Some("rotated-away"))?), query, json!({}))
        .await?;
    ensure!(status == 401, "unknown kid: {status} {body}");
    // HS256 is not accepted once keys come from a JWKS, whatever it is signed with.
    let hs256 = signed(TEST_JWT_SECRET, claims.clone())?;
    let (status, body) = kernel.graphql_as(Some(&hs256), query, json!({})).await?;
    ensure!(status == 401, "HS256 with a JWKS: {status} {body}");

    // A customer of an identity provider whose subjects are not UUIDs
    // (Auth0's `auth0|…`) buys, as the customer id their subject maps to,
    // and another subject of the same provider cannot see the order.
    let as_subject = |subject: &str| {
        let claims = json!({ "sub": subject, "roles": ["customer"], "iss": "https://idp.test/", "aud": "shop", "exp": now() + 60 });
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key)
    };
    let (ada, eve) = (
        as_subject("auth0|64f1c0ffee00000000000001")?,
        as_subject("auth0|64f1c0ffee00000000000002")?,
    );
    let ada_id = commerce_kernel::auth::customer_id_of(
        "https://idp.test/",
        "auth0|64f1c0ffee00000000000001",
    );
    let admin = sign(Some("test-key-1"))?;
    let (_, created) = kernel
        .graphql_as(
            Some(&admin),
            "mutation { createProduct(input: { sku: \"IDP-1\", name: \"Mug\", price: { amount: \"9.50\", currency: \"EUR\" } }) { product { id } } }",
            json!({}),
        )
        .await?;
    let product = created["data"]["createProduct"]["product"]["id"].clone();
    let (_, stocked) = kernel
        .graphql_as(
            Some(&admin),
            "mutation ($id: UUID!) { adjustInventory(input: { productId: $id, delta: 5, reason: \"stock\" }) { errors { code } } }",
            json!({ "id": product }),
        )
        .await?;
    ensure!(
        stocked["data"]["adjustInventory"]["errors"] == json!([]),
        "{stocked}"
    );
    let (_, made) = kernel
        .graphql_as(
            Some(&ada),
            CREATE_CART,
            json!({ "input": { "items": [{ "productId": product, "quantity": 1 }] } }),
        )
        .await?;
    let cart = &made["data"]["createCart"]["cart"];
    ensure!(cart["customerId"] == json!(ada_id), "{made}");
    let (_, placed) = kernel
        .graphql_as(
            Some(&ada),
            PLACE_ORDER,
            json!({ "cart": cart["id"], "address": shop::address("DE") }),
        )
        .await?;
    let order = &placed["data"]["placeOrder"]["order"];
    ensure!(order["customerId"] == json!(ada_id), "{placed}");
    let read = "query ($id: UUID!) { order(id: $id) { id } }";
    let (_, hers) = kernel
        .graphql_as(Some(&ada), read, json!({ "id": order["id"] }))
        .await?;
    ensure!(hers["data"]["order"]["id"] == order["id"], "{hers}");
    let (_, theirs) = kernel
        .graphql_as(Some(&eve), read, json!({ "id": order["id"] }))
        .await?;
    ensure!(theirs["data"]["order"].is_null(), "{theirs}");
    let (_, events) = kernel
        .graphql_as(
            Some(&admin),
            "query ($id: UUID!) { aggregateEvents(aggregateId: $id) { edges { node { actor } } } }",
            json!({ "id": order["id"] }),
        )
        .await?;
    ensure!(
        events["data"]["aggregateEvents"]["edges"][0]["node"]["actor"]
            == "customer:auth0|64f1c0ffee00000000000001",
        "the subject is on record: {events}"
    );
    kernel.stop().await?;
    idp.abort();
    Ok(())
}

/// What a customer may call, by root field; every root field must be listed.
const OWN_DATA_FIELDS: &[&str] = &[
    "order",
    "orders",
    "cart",
    "cancelOrder",
    "createCart",
    "upsertCartItems",
    "removeCartItem",
    "clearCart",
    "placeOrder",
    "orderStatusChanged",
];
const CATALOG_FIELDS: &[&str] = &["product", "products", "inventory"];
/// Open to anyone who may start a guest session (without a token, too).
const GUEST_FIELDS: &[&str] = &["createGuestSession"];

/// A document selecting each of [`OWN_DATA_FIELDS`], as a caller without a
/// token might send it.
fn own_data_documents(id: Uuid) -> Vec<(&'static str, String)> {
    vec![
        ("order", format!("{{ order(id: \"{id}\") {{ id }} }}")),
        ("orders", "{ orders { totalCount } }".to_string()),
        ("cart", format!("{{ cart(id: \"{id}\") {{ id }} }}")),
        (
            "cancelOrder",
            format!(
                "mutation {{ cancelOrder(id: \"{id}\", reason: \"x\") {{ errors {{ code }} }} }}"
            ),
        ),
        (
            "createCart",
            "mutation { createCart(input: { sessionId: \"s\" }) { errors { code } } }".to_string(),
        ),
        (
            "upsertCartItems",
            format!(
                "mutation {{ upsertCartItems(cartId: \"{id}\", items: []) {{ errors {{ code }} }} }}"
            ),
        ),
        (
            "removeCartItem",
            format!(
                "mutation {{ removeCartItem(cartId: \"{id}\", productId: \"{id}\") {{ errors {{ code }} }} }}"
            ),
        ),
        (
            "clearCart",
            format!("mutation {{ clearCart(cartId: \"{id}\") {{ errors {{ code }} }} }}"),
        ),
        (
            "placeOrder",
            format!(
                "mutation {{ placeOrder(input: {{ cartId: \"{id}\", paymentMethod: \"x\", shippingAddress: {{ name: \"a\", line1: \"b\", city: \"c\", postalCode: \"1\", country: \"DE\" }} }}) {{ errors {{ code }} }} }}"
            ),
        ),
        (
            "orderStatusChanged",
            format!("subscription {{ orderStatusChanged(orderId: \"{id}\") {{ status }} }}"),
        ),
    ]
}

/// Admin-only root fields, each with a document a customer sends.
fn admin_only_documents(id: Uuid) -> Vec<(&'static str, String)> {
    [
        ("events", "{ events { totalCount } }".to_string()),
        ("aggregateEvents", format!("{{ aggregateEvents(aggregateId: \"{id}\") {{ totalCount }} }}")),
        ("eventLogHead", "{ eventLogHead }".to_string()),
        ("reservation", format!("{{ reservation(id: \"{id}\") {{ id }} }}")),
        ("projections", "{ projections { name } }".to_string()),
        ("abandonedCarts", "{ abandonedCarts(hours: 1) { totalCount } }".to_string()),
        (
            "kpis",
            "{ kpis(from: \"2001-01-01T00:00:00Z\", to: \"2001-01-02T00:00:00Z\") { ordersPlaced } }"
                .to_string(),
        ),
        ("plugins", "{ plugins { totalCount } }".to_string()),
        ("sagas", "{ sagas { totalCount } }".to_string()),
        ("saga", format!("{{ saga(id: \"{id}\") {{ id }} }}")),
        ("sagaDefinition", "{ sagaDefinition { revision } }".to_string()),
        (
            "createProduct",
            "mutation { createProduct(input: { sku: \"HACK\", name: \"x\", price: { amount: \"1\", currency: \"EUR\" } }) { errors { code } } }".to_string(),
        ),
        (
            "updateProduct",
            format!("mutation {{ updateProduct(input: {{ id: \"{id}\", name: \"x\" }}) {{ errors {{ code }} }} }}"),
        ),
        (
            "adjustInventory",
            format!("mutation {{ adjustInventory(input: {{ productId: \"{id}\", delta: 5, reason: \"x\" }}) {{ errors {{ code }} }} }}"),
        ),
        (
            "reserveInventory",
            format!("mutation {{ reserveInventory(productId: \"{id}\", quantity: 1) {{ errors {{ code }} }} }}"),
        ),
        (
            "releaseInventory",
            format!("mutation {{ releaseInventory(reservationId: \"{id}\") {{ errors {{ code }} }} }}"),
        ),
        ("rebuildProjections", "mutation { rebuildProjections { errors { code } } }".to_string()),
        (
            "installPlugin",
            "mutation { installPlugin(input: { manifest: \"x\", component: \"eA==\" }) { errors { code } } }".to_string(),
        ),
        (
            "activatePlugin",
            "mutation { activatePlugin(input: { name: \"payment\", version: \"1.0.0\" }) { errors { code } } }".to_string(),
        ),
        (
            "rollbackPlugin",
            "mutation { rollbackPlugin(input: { name: \"payment\" }) { errors { code } } }".to_string(),
        ),
        (
            "defineSaga",
            "mutation { defineSaga(input: { steps: [] }) { errors { code } } }".to_string(),
        ),
        ("retrySaga", format!("mutation {{ retrySaga(id: \"{id}\") {{ errors {{ code }} }} }}")),
        (
            "retryParkedSagas",
            "mutation { retryParkedSagas { errors { code } } }".to_string(),
        ),
        (
            "compensateSaga",
            format!("mutation {{ compensateSaga(id: \"{id}\", reason: \"x\") {{ errors {{ code }} }} }}"),
        ),
        (
            "compensateSagas",
            format!("mutation {{ compensateSagas(ids: [\"{id}\"], reason: \"x\") {{ errors {{ code }} }} }}"),
        ),
        (
            "reconcileInventory",
            "mutation { reconcileInventory(repair: true) { errors { code } } }".to_string(),
        ),
        (
            "pruneStore",
            "mutation { pruneStore(dryRun: false) { finishedSagas } }".to_string(),
        ),
    ]
    .into_iter()
    .collect()
}

/// The root fields of the schema's query, mutation and subscription types.
fn root_fields() -> BTreeSet<String> {
    let sdl = commerce_kernel::api::sdl();
    let mut fields = BTreeSet::new();
    for root in ["type Query {", "type Mutation {", "type Subscription {"] {
        let start = sdl
            .find(root)
            .unwrap_or_else(|| panic!("the schema has no `{root}`"));
        let body = &sdl[start + root.len()..];
        let body = &body[..body.find("\n}").unwrap_or(body.len())];
        let mut depth = 0usize;
        let mut in_docs = false;
        for line in body.lines() {
            let trimmed = line.trim();
            if trimmed == "\"\"\""
                || (trimmed.starts_with("\"\"\"") && !trimmed.ends_with("\"\"\""))
            {
                in_docs = !in_docs;
                continue;
            }
            if in_docs || trimmed.starts_with("\"\"\"") {
                continue;
            }
            if depth == 0 && line.starts_with('\t') && !line.starts_with("\t\t") {
                let name: String = trimmed
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    fields.insert(name);
                }
            }
            depth =
                (depth + trimmed.matches('(').count()).saturating_sub(trimmed.matches(')').count());
        }
    }
    fields
}

const CREATE_CART: &str = "mutation ($input: CreateCartInput!) { createCart(input: $input) { cart { id customerId } errors { field code message } } }";
const PLACE_ORDER: &str = "mutation ($cart: UUID!, $address: AddressInput!, $method: String! = \"tok_visa\") { placeOrder(input: { cartId: $cart, paymentMethod: $method, shippingAddress: $address }) { order { id customerId status } errors { field code message } } }";

async fn customers_reach_only_their_own_carts_and_orders(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    // Every root field is classified, so a new one cannot skip this test.
    let classified: BTreeSet<String> = OWN_DATA_FIELDS
        .iter()
        .chain(CATALOG_FIELDS)
        .chain(GUEST_FIELDS)
        .map(|s| s.to_string())
        .chain(
            admin_only_documents(Uuid::nil())
                .into_iter()
                .map(|(f, _)| f.to_string()),
        )
        .collect();
    let fields = root_fields();
    ensure!(
        fields.len() > 30,
        "root fields not found in the SDL: {fields:?}"
    );
    ensure!(
        fields == classified,
        "unclassified root fields: {:?}; classified but gone: {:?}",
        fields.difference(&classified).collect::<Vec<_>>(),
        classified.difference(&fields).collect::<Vec<_>>()
    );

    let kernel = RunningKernel::start(&db, &[]).await?;
    let product = shop::stocked_product(&kernel, 10).await?;
    let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let (alice_token, bob_token) = (kernel.customer_token(alice)?, kernel.customer_token(bob)?);
    let as_alice = |query: &str, variables: Value| {
        let token = alice_token.clone();
        let query = query.to_string();
        let kernel = &kernel;
        async move { kernel.graphql_as(Some(&token), &query, variables).await }
    };
    let as_bob = |query: &str, variables: Value| {
        let token = bob_token.clone();
        let query = query.to_string();
        let kernel = &kernel;
        async move { kernel.graphql_as(Some(&token), &query, variables).await }
    };

    // Alice's cart is hers without naming herself; naming Bob is refused.
    let (_, made) = as_alice(
        CREATE_CART,
        json!({ "input": { "items": [{ "productId": product, "quantity": 1 }] } }),
    )
    .await?;
    let cart = made["data"]["createCart"]["cart"].clone();
    ensure!(cart["customerId"] == json!(alice), "{made}");
    let cart_id = cart["id"].clone();
    let (_, for_bob) = as_alice(CREATE_CART, json!({ "input": { "customerId": bob } })).await?;
    ensure!(
        payload_codes(&for_bob["data"]["createCart"]) == ["INVALID_INPUT"],
        "{for_bob}"
    );
    let (_, session) = as_alice(CREATE_CART, json!({ "input": { "sessionId": "s-1" } })).await?;
    ensure!(
        payload_codes(&session["data"]["createCart"]) == ["INVALID_INPUT"],
        "{session}"
    );
    // A second cart Alice keeps open, for Bob to try to change.
    let (_, open) = as_alice(
        CREATE_CART,
        json!({ "input": { "items": [{ "productId": product, "quantity": 2 }] } }),
    )
    .await?;
    let open_cart = open["data"]["createCart"]["cart"]["id"].clone();

    let (_, placed) = as_alice(
        PLACE_ORDER,
        json!({ "cart": cart_id, "address": shop::address("DE") }),
    )
    .await?;
    let order = placed["data"]["placeOrder"]["order"].clone();
    ensure!(order["customerId"] == json!(alice), "{placed}");
    let order_id = order["id"].clone();

    // Alice sees hers; the admin sees everyone's.
    let read_order = "query ($id: UUID!) { order(id: $id) { id status } }";
    let (_, mine) = as_alice(read_order, json!({ "id": order_id })).await?;
    ensure!(mine["data"]["order"]["id"] == order_id, "{mine}");
    let admin_view = kernel
        .graphql(read_order, json!({ "id": order_id }))
        .await?;
    ensure!(
        admin_view["data"]["order"]["id"] == order_id,
        "{admin_view}"
    );
    let list = "query ($customer: UUID) { orders(customerId: $customer) { totalCount edges { node { id customerId } } } }";
    let (_, alices) = as_alice(list, json!({})).await?;
    ensure!(alices["data"]["orders"]["totalCount"] == 1, "{alices}");
    let everyone = kernel.graphql(list, json!({ "customer": alice })).await?;
    ensure!(everyone["data"]["orders"]["totalCount"] == 1, "{everyone}");

    // Bob: Alice's ids read exactly like ids that do not exist.
    let nobody = Uuid::now_v7();
    for id in [order_id.clone(), json!(nobody)] {
        let (_, seen) = as_bob(read_order, json!({ "id": id })).await?;
        ensure!(
            seen["data"]["order"].is_null() && seen.get("errors").is_none(),
            "{seen}"
        );
        let as_of = "query ($id: UUID!) { order(id: $id, asOfVersion: 1) { id } }";
        let (_, seen) = as_bob(as_of, json!({ "id": id })).await?;
        ensure!(seen["data"]["order"].is_null(), "{seen}");
        let (_, cancelled) = as_bob(
            "mutation ($id: UUID!) { cancelOrder(id: $id, reason: \"mine now\") { order { id } errors { code } } }",
            json!({ "id": id }),
        )
        .await?;
        ensure!(
            payload_codes(&cancelled["data"]["cancelOrder"]) == ["NOT_FOUND"],
            "{cancelled}"
        );
    }
    let (_, bobs) = as_bob(list, json!({ "customer": alice })).await?;
    ensure!(bobs["data"]["orders"]["totalCount"] == 0, "{bobs}");
    ensure!(bobs["data"]["orders"]["edges"] == json!([]), "{bobs}");
    let cart_mutations = [
        (
            "upsertCartItems",
            "mutation ($cart: UUID!, $product: UUID!) { upsertCartItems(cartId: $cart, items: [{ productId: $product, quantity: 5 }]) { cart { id } errors { code } } }",
        ),
        (
            "removeCartItem",
            "mutation ($cart: UUID!, $product: UUID!) { removeCartItem(cartId: $cart, productId: $product) { cart { id } errors { code } } }",
        ),
        (
            "clearCart",
            "mutation ($cart: UUID!) { clearCart(cartId: $cart) { cart { id } errors { code } } }",
        ),
        (
            "placeOrder",
            "mutation ($cart: UUID!) { placeOrder(input: { cartId: $cart, paymentMethod: \"tok_visa\", shippingAddress: { name: \"B\", line1: \"x\", city: \"x\", postalCode: \"1\", country: \"DE\" } }) { order { id } errors { code } } }",
        ),
    ];
    for id in [open_cart.clone(), json!(nobody)] {
        let (_, seen) = as_bob(
            "query ($id: UUID!) { cart(id: $id) { id } }",
            json!({ "id": id }),
        )
        .await?;
        ensure!(
            seen["data"]["cart"].is_null() && seen.get("errors").is_none(),
            "{seen}"
        );
        for (field, mutation) in cart_mutations {
            let (_, answer) = as_bob(mutation, json!({ "cart": id, "product": product })).await?;
            ensure!(
                payload_codes(&answer["data"][field]) == ["NOT_FOUND"],
                "{field}: {answer}"
            );
        }
    }
    // Nothing of Alice's changed.
    let (_, still) = as_alice(
        "query ($id: UUID!) { cart(id: $id) { status itemCount } }",
        json!({ "id": open_cart }),
    )
    .await?;
    ensure!(
        still["data"]["cart"] == json!({ "status": "OPEN", "itemCount": 2 }),
        "{still}"
    );
    let (_, still) = as_alice(read_order, json!({ "id": order_id })).await?;
    ensure!(still["data"]["order"]["status"] != "CANCELLED", "{still}");

    // Subscriptions: Bob cannot follow Alice's order.
    let mut socket = Socket::connect(
        &kernel,
        Protocol::TransportWs,
        json!({ "authorization": format!("Bearer {bob_token}") }),
    )
    .await?
    .map_err(|e| anyhow::anyhow!("Bob's socket refused: {e}"))?;
    socket
        .subscribe("1", ORDER_UPDATES, json!({ "id": order_id }))
        .await?;
    match socket.next_frame().await? {
        Frame::Error(errors) => ensure!(errors[0]["extensions"]["code"] == "NOT_FOUND", "{errors}"),
        other => bail!("Bob followed Alice's order: {other:?}"),
    }

    // The catalog is everyone's; everything else is the admin's.
    let (status, catalog) = as_bob(
        "query ($id: UUID!) { product(id: $id) { id } products { totalCount } inventory(productId: $id) { available } }",
        json!({ "id": product }),
    )
    .await?;
    ensure!(
        status == 200 && catalog["data"]["product"]["id"] == json!(product),
        "{catalog}"
    );
    for (field, document) in admin_only_documents(product) {
        let (status, answer) = as_bob(&document, json!({})).await?;
        ensure!(
            status == 200 && error_code(&answer) == Some("FORBIDDEN"),
            "{field}: {answer}"
        );
    }
    // A saga step's raw output is for admins, even on the customer's own order.
    let (_, output) = as_alice(
        "query ($id: UUID!) { order(id: $id) { saga { steps { name output } } } }",
        json!({ "id": order_id }),
    )
    .await?;
    ensure!(error_code(&output) == Some("FORBIDDEN"), "{output}");
    // None of the refused mutations wrote anything (the saga may still be
    // writing Alice's order, so compare what the customer could have
    // touched: products, stock, plugins, the saga definition).
    let products = kernel.graphql("{ products { totalCount } inventory: products { edges { node { inventory { onHand } } } } }", json!({})).await?;
    ensure!(
        products["data"]["products"]["totalCount"] == 1,
        "{products}"
    );
    ensure!(
        products["data"]["inventory"]["edges"][0]["node"]["inventory"]["onHand"] == 10,
        "{products}"
    );
    let untouched = kernel
        .graphql(
            "{ plugins { edges { node { activeVersion { version } } } } sagaDefinition { revision } }",
            json!({}),
        )
        .await?;
    ensure!(
        untouched["data"]["sagaDefinition"] == json!({ "revision": 0 })
            && untouched["data"]["plugins"]["edges"]
                .as_array()
                .is_some_and(|edges| edges.iter().all(|e| e["node"]["activeVersion"].is_null())),
        "{untouched}"
    );
    kernel.stop().await
}

const ORDER_UPDATES: &str = "subscription ($id: UUID!, $after: String) {
  orderStatusChanged(orderId: $id, after: $after) {
    cursor orderId eventType status step { name status } saga { status }
  }
}";

/// A customer's one-item order placed on `kernel`; its id.
async fn customer_order(
    kernel: &RunningKernel,
    token: &str,
    product: Uuid,
) -> anyhow::Result<Uuid> {
    customer_order_paid_with(kernel, token, product, "tok_visa").await
}

/// A customer's one-item order, paid with `payment_method`; its id.
async fn customer_order_paid_with(
    kernel: &RunningKernel,
    token: &str,
    product: Uuid,
    payment_method: &str,
) -> anyhow::Result<Uuid> {
    let (_, made) = kernel
        .graphql_as(
            Some(token),
            CREATE_CART,
            json!({ "input": { "items": [{ "productId": product, "quantity": 1 }] } }),
        )
        .await?;
    let cart = made["data"]["createCart"]["cart"]["id"].clone();
    ensure!(cart.is_string(), "{made}");
    let (_, placed) = kernel
        .graphql_as(
            Some(token),
            PLACE_ORDER,
            json!({ "cart": cart, "address": shop::address("DE"), "method": payment_method }),
        )
        .await?;
    let id = placed["data"]["placeOrder"]["order"]["id"].clone();
    serde_json::from_value(id).with_context(|| format!("{placed}"))
}

/// Reads updates until the subscription completes; `limit` stops earlier.
async fn collect_updates(socket: &mut Socket, limit: usize) -> anyhow::Result<(Vec<Value>, bool)> {
    let mut updates = Vec::new();
    while updates.len() < limit {
        match socket.next_frame().await? {
            Frame::Next(payload) => {
                ensure!(payload.get("errors").is_none(), "{payload}");
                updates.push(payload["data"]["orderStatusChanged"].clone());
            }
            Frame::Complete => return Ok((updates, true)),
            other => bail!(
                "unexpected frame after {} updates: {other:?}",
                updates.len()
            ),
        }
    }
    Ok((updates, false))
}

fn cursors(updates: &[Value]) -> Vec<String> {
    updates
        .iter()
        .map(|u| u["cursor"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Checks one order's updates: PENDING first, CONFIRMED last, log order.
fn check_story(updates: &[Value]) -> anyhow::Result<()> {
    let statuses: Vec<&str> = updates
        .iter()
        .filter_map(|u| u["status"].as_str())
        .collect();
    ensure!(statuses.first() == Some(&"PENDING"), "{statuses:?}");
    ensure!(statuses.last() == Some(&"CONFIRMED"), "{statuses:?}");
    for status in ["INVENTORY_RESERVED", "PAID", "SHIPPED"] {
        ensure!(statuses.contains(&status), "{status} missing: {statuses:?}");
    }
    let positions: Vec<commerce_kernel::event_store::Position> = cursors(updates)
        .iter()
        .map(|c| c.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    ensure!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "cursors out of order"
    );
    let payment_done = updates
        .iter()
        .any(|u| u["step"]["name"] == "payment" && u["step"]["status"] == "SUCCEEDED");
    ensure!(payment_done, "no payment step update: {updates:?}");
    ensure!(
        updates
            .last()
            .is_some_and(|u| u["saga"]["status"] == "COMPLETED"),
        "the last update does not show the saga completed"
    );
    Ok(())
}

/// Without a token, the catalog and guest sessions answer and nothing
/// else does: every other root field is refused with 401, also when it hides
/// in a fragment, an inline fragment, a batch or another operation of the
/// document; and the catalog closes when the settings say so.
async fn without_a_token_only_the_catalog_and_guest_sessions_answer(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let product = shop::stocked_product(&kernel, 3).await?;
    let anonymous = |body: Value| {
        let kernel = &kernel;
        async move {
            let response = kernel
                .http
                .post(kernel.url("/graphql"))
                .json(&body)
                .send()
                .await?;
            let status = response.status().as_u16();
            let body: Value = response.json().await?;
            anyhow::Ok((status, body))
        }
    };

    let open = [
        "{ products { totalCount edges { node { id name price { amount currency } inventory { available } } } } }".to_string(),
        format!("{{ product(id: \"{product}\") {{ name }} }}"),
        format!("{{ inventory(productId: \"{product}\") {{ available }} }}"),
        "mutation { createGuestSession { session { token customerId } errors { code } } }".to_string(),
        "{ __typename }".to_string(),
    ];
    for query in &open {
        let (status, body) = anonymous(json!({ "query": query })).await?;
        ensure!(
            status == 200 && body.get("errors").is_none(),
            "{query}: {status} {body}"
        );
    }
    let (_, listed) = anonymous(json!({ "query": &open[0] })).await?;
    ensure!(
        listed["data"]["products"]["edges"][0]["node"]["inventory"]["available"] == 3,
        "stock availability is public: {listed}"
    );

    // Every other root field, so a new one cannot skip this test.
    let closed: Vec<(&str, String)> = own_data_documents(product)
        .into_iter()
        .chain(admin_only_documents(product))
        .collect();
    let classified: BTreeSet<String> = closed
        .iter()
        .map(|(field, _)| field.to_string())
        .chain(
            CATALOG_FIELDS
                .iter()
                .chain(GUEST_FIELDS)
                .map(|f| f.to_string()),
        )
        .collect();
    ensure!(
        classified == root_fields(),
        "unclassified: {:?}",
        root_fields().difference(&classified).collect::<Vec<_>>()
    );
    let refused = |what: &str, (status, body): (u16, Value)| {
        ensure!(
            status == 401 && error_code(&body) == Some("UNAUTHENTICATED"),
            "{what}: {status} {body}"
        );
        Ok(())
    };
    for (field, query) in &closed {
        refused(field, anonymous(json!({ "query": query })).await?)?;
    }
    let smuggled = [
        "{ products { totalCount } ...F } fragment F on Query { eventLogHead }",
        "{ products { totalCount } ... on Query { orders { totalCount } } }",
        "{ products { totalCount } ...A } fragment A on Query { ...B } fragment B on Query { sagas { totalCount } }",
        "query Shop { products { totalCount } } query Log { eventLogHead }",
    ];
    for query in smuggled {
        refused(query, anonymous(json!({ "query": query })).await?)?;
    }
    refused(
        "an operation chosen by name",
        anonymous(json!({ "query": smuggled[3], "operationName": "Log" })).await?,
    )?;
    let (status, _) = anonymous(json!({ "query": smuggled[3], "operationName": "Shop" })).await?;
    ensure!(status == 200, "the public operation of the two: {status}");
    refused(
        "a batch",
        anonymous(json!([{ "query": open[0] }, { "query": "{ eventLogHead }" }])).await?,
    )?;
    // Fragments spread into each other twice per level: 2^30 root fields if
    // each spread were expanded anew. Answered at once, either way.
    let mut doubling = "{ ...F0 }".to_string();
    for level in 0..30 {
        doubling.push_str(&format!(
            " fragment F{level} on Query {{ ...F{next} ...F{next} }}",
            next = level + 1
        ));
    }
    doubling.push_str(" fragment F30 on Query { products { totalCount } }");
    let started = std::time::Instant::now();
    let (status, body) = anonymous(json!({ "query": doubling })).await?;
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "doubling fragments took {:?}: {status} {body}",
        started.elapsed()
    );
    ensure!(
        error_code(&body) == Some("INVALID_QUERY"),
        "refused as too large: {status} {body}"
    );
    // The same for a caller with a token, before any other check runs.
    let started = std::time::Instant::now();
    let with_token = kernel.graphql(&doubling, json!({})).await?;
    ensure!(
        started.elapsed() < Duration::from_secs(5)
            && error_code(&with_token) == Some("INVALID_QUERY"),
        "doubling fragments as an admin took {:?}: {with_token}",
        started.elapsed()
    );
    // Spreads alone, four per level, ending in a fragment that does not
    // exist: nothing to count as fields, 4^31 spreads to walk.
    let mut unknown = "{ ...F0 }".to_string();
    for level in 0..31 {
        let next = format!("...F{}", level + 1);
        unknown.push_str(&format!(
            " fragment F{level} on Query {{ {next} {next} {next} {next} }}"
        ));
    }
    unknown.push_str(" fragment F31 on Query { ...Missing }");
    let started = std::time::Instant::now();
    refused(
        "spreads of a missing fragment",
        anonymous(json!({ "query": unknown })).await?,
    )?;
    let with_token = kernel.graphql(&unknown, json!({})).await?;
    ensure!(
        started.elapsed() < Duration::from_secs(5)
            && error_code(&with_token) == Some("INVALID_QUERY"),
        "spreads of a missing fragment took {:?}: {with_token}",
        started.elapsed()
    );
    let mut hidden = doubling.replace("products { totalCount }", "eventLogHead");
    refused(
        "doubling fragments ending in a private field",
        anonymous(json!({ "query": hidden })).await?,
    )?;
    hidden = format!(
        "{{ products {{ totalCount }} {} }}",
        "p: products { totalCount } ".repeat(300)
    );
    refused(
        "too many root selections",
        anonymous(json!({ "query": hidden })).await?,
    )?;

    // Turned off: the catalog and guest sessions need a token too.
    let closed_shop = RunningKernel::join(
        &kernel,
        &db,
        &[
            (config::PUBLIC_CATALOG, "false"),
            (config::GUEST_SESSIONS, "false"),
        ],
    )
    .await?;
    for query in &open[..4] {
        let response = closed_shop
            .http
            .post(closed_shop.url("/graphql"))
            .json(&json!({ "query": query }))
            .send()
            .await?;
        ensure!(response.status() == 401, "{query}: {}", response.status());
    }
    // With a token, a kernel without guest sessions says so.
    let (_, body) = closed_shop
        .graphql_as(
            Some(&closed_shop.customer_token(Uuid::now_v7())?),
            &open[3],
            json!({}),
        )
        .await?;
    ensure!(error_code(&body) == Some("FORBIDDEN"), "{body}");
    closed_shop.stop().await?;
    kernel.stop().await
}

async fn an_order_is_watched_live_to_confirmed_and_resumed_without_gaps(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let shop = shop::open(&kernel, 5).await?;
    let customer = Uuid::now_v7();
    let token = kernel.customer_token(customer)?;
    let order = customer_order(&kernel, &token, shop.product).await?;

    // graphql-transport-ws, token in connection_init: the first two
    // updates, then the connection drops.
    let mut socket = Socket::connect(
        &kernel,
        Protocol::TransportWs,
        json!({ "Authorization": format!("Bearer {token}") }),
    )
    .await?
    .map_err(|e| anyhow::anyhow!("socket refused: {e}"))?;
    socket
        .subscribe("live", ORDER_UPDATES, json!({ "id": order }))
        .await?;
    let (first, _) = collect_updates(&mut socket, 2).await?;
    ensure!(
        first[0]["status"] == "PENDING" && first[0]["orderId"] == json!(order),
        "{first:?}"
    );
    drop(socket);

    // The legacy graphql-ws protocol, resuming after the last cursor seen.
    let mut socket = Socket::connect(&kernel, Protocol::LegacyWs, json!({ "token": token }))
        .await?
        .map_err(|e| anyhow::anyhow!("legacy socket refused: {e}"))?;
    socket
        .subscribe(
            "resume",
            ORDER_UPDATES,
            json!({ "id": order, "after": first[1]["cursor"] }),
        )
        .await?;
    let (rest, completed) = collect_updates(&mut socket, 1_000).await?;
    ensure!(completed, "the subscription did not end after CONFIRMED");
    let mut resumed = first.clone();
    resumed.extend(rest);
    check_story(&resumed)?;

    // The whole story again from the start: the same updates, none skipped,
    // none twice; and as many as the order and its saga have events.
    let mut socket = Socket::connect(&kernel, Protocol::TransportWs, json!({ "token": token }))
        .await?
        .map_err(|e| anyhow::anyhow!("socket refused: {e}"))?;
    socket
        .subscribe("again", ORDER_UPDATES, json!({ "id": order }))
        .await?;
    let (whole, completed) = collect_updates(&mut socket, 1_000).await?;
    ensure!(completed);
    ensure!(
        cursors(&whole) == cursors(&resumed),
        "resumed story differs:\n{whole:?}\n{resumed:?}"
    );
    ensure!(whole == resumed, "updates differ between runs");
    // The order's events as its read model shows them, once it has caught
    // up with the log the subscription followed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let saga = loop {
        let body = kernel
            .graphql(
                "query ($id: UUID!) { order(id: $id) { status events { id } saga { id } } }",
                json!({ "id": order }),
            )
            .await?;
        if body["data"]["order"]["status"] == "CONFIRMED" {
            break body;
        }
        ensure!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let saga_id = saga["data"]["order"]["saga"]["id"].clone();
    let saga_events = kernel
        .graphql(
            "query ($id: UUID!) { aggregateEvents(aggregateId: $id) { totalCount } }",
            json!({ "id": saga_id }),
        )
        .await?;
    let expected = saga["data"]["order"]["events"]
        .as_array()
        .map_or(0, Vec::len)
        + saga_events["data"]["aggregateEvents"]["totalCount"]
            .as_u64()
            .unwrap_or(0) as usize;
    ensure!(
        whole.len() == expected,
        "{} updates for {expected} events",
        whole.len()
    );
    ensure!(shop.payments.payments_for(&order.to_string()).len() == 1);

    // A cursor that is not one is refused clearly.
    let mut socket = Socket::connect(&kernel, Protocol::TransportWs, json!({ "token": token }))
        .await?
        .map_err(|e| anyhow::anyhow!("socket refused: {e}"))?;
    socket
        .subscribe(
            "bad",
            ORDER_UPDATES,
            json!({ "id": order, "after": "yesterday" }),
        )
        .await?;
    match socket.next_frame().await? {
        Frame::Error(errors) => ensure!(
            errors[0]["extensions"]["code"] == "INVALID_INPUT",
            "{errors}"
        ),
        other => bail!("a bad cursor was accepted: {other:?}"),
    }
    kernel.stop().await
}

/// Defines the fulfilment saga with a payment step retried 2 s after a
/// failure (the other steps retry as [`shop::RETRY`] says).
async fn define_slow_payment(kernel: &RunningKernel) -> anyhow::Result<()> {
    let slow_payment = format!(
        "mutation {{ defineSaga(input: {{ timeoutMs: 60000, steps: [
            {{ name: \"reserve-inventory\", kind: RESERVE_INVENTORY, retry: {retry} }},
            {{ name: \"payment\", kind: PAYMENT, plugin: \"payment\", retry: {{ maxAttempts: 3, initialBackoffMs: 2000, maxBackoffMs: 2000, timeoutMs: 2000 }} }},
            {{ name: \"shipment\", kind: SHIPMENT, plugin: \"shipping\", retry: {retry} }},
            {{ name: \"confirm\", kind: CONFIRM, retry: {retry} }} ] }}) {{ errors {{ code message }} }} }}",
        retry = shop::RETRY
    );
    kernel
        .mutate("defineSaga", &slow_payment, json!({}))
        .await
        .map(drop)
}

async fn subscribers_see_orders_placed_on_another_kernel(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    // Node B takes the orders and runs their sagas; node A only serves the
    // subscriber. A looks for due sagas and at the log tail rarely: with
    // Redis, B's changes reach A's subscriber only through pub/sub. Without
    // Redis they arrive through A's log follower alone, as they would after
    // a lost message.
    let node_b = RunningKernel::start(&db, &[]).await?;
    let with_redis = matches!(
        node_b.carts.config,
        commerce_kernel::carts::CartBackendConfig::Redis { .. }
    );
    let live_poll = if with_redis { "60000" } else { "200" };
    let node_a = RunningKernel::join(
        &node_b,
        &db,
        &[
            (config::SAGA_POLL_MS, "60000"),
            (config::LIVE_POLL_MS, live_poll),
        ],
    )
    .await?;
    let shop = shop::open(&node_b, 5).await?;
    // The first payment attempt fails and is retried later, so the
    // subscription is open before the order moves on.
    define_slow_payment(&node_b).await?;
    shop.payments.fail_next(1);
    let token = node_b.customer_token(Uuid::now_v7())?;
    let order = customer_order(&node_b, &token, shop.product).await?;

    let mut socket = Socket::connect(&node_a, Protocol::TransportWs, json!({ "token": token }))
        .await?
        .map_err(|e| anyhow::anyhow!("socket refused: {e}"))?;
    socket
        .subscribe("x", ORDER_UPDATES, json!({ "id": order }))
        .await?;
    let (updates, completed) = collect_updates(&mut socket, 1_000).await?;
    ensure!(completed);
    check_story(&updates)?;
    let failed_once = updates
        .iter()
        .any(|u| u["eventType"] == "StepFailed" && u["step"]["name"] == "payment");
    ensure!(failed_once, "the payment never failed first: {updates:?}");
    node_a.stop().await?;
    node_b.stop().await
}

/// The saga commits its last steps while an older transaction is open, so
/// the wake-ups find nothing readable. With the log follower and the idle
/// recheck out of reach (60 s and 30 s, past the socket's 20 s frame
/// timeout), the updates can only arrive through the wait for the log's
/// readable head once that transaction ends.
async fn an_update_committed_behind_an_open_transaction_arrives_once_the_log_shows_it(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[(config::LIVE_POLL_MS, "60000")]).await?;
    let shop = shop::open(&kernel, 5).await?;
    // The first payment attempt fails and is retried 2 s later.
    define_slow_payment(&kernel).await?;
    shop.payments.fail_next(1);
    let token = kernel.customer_token(Uuid::now_v7())?;
    let order = customer_order(&kernel, &token, shop.product).await?;
    let mut socket = Socket::connect(&kernel, Protocol::TransportWs, json!({ "token": token }))
        .await?
        .map_err(|e| anyhow::anyhow!("socket refused: {e}"))?;
    socket
        .subscribe("x", ORDER_UPDATES, json!({ "id": order }))
        .await?;
    let Frame::Next(first) = socket.next_frame().await? else {
        bail!("no first update");
    };

    // An unrelated append held open: everything committed after it stays
    // out of the global log until it ends.
    let held = db
        .hold_append(AppendRequest::single(
            Uuid::now_v7(),
            "account",
            0,
            vec![NewEvent::new("Opened", json!({}))],
        ))
        .await?;
    let saga_id = Saga::id_for(ORDER_FULFILMENT, order);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        // The saga's stream is readable directly, whatever the log shows.
        let saga = db
            .event_store()
            .read_stream(saga_id, StreamSelection::default())
            .await?;
        if saga.iter().any(|event| event.event_type == "Completed") {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the saga did not complete"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shown = EventFilter {
        aggregate_id: Some(saga_id),
        ..EventFilter::default()
    };
    let in_log = db
        .event_store()
        .read_all_matching(&shown, Position::START, 100)
        .await?;
    ensure!(
        !in_log.iter().any(|event| event.event_type == "Completed"),
        "the saga completed before the transaction was held: nothing to test"
    );
    held.commit().await?;

    let (mut updates, completed) = collect_updates(&mut socket, 1_000).await?;
    ensure!(completed, "{updates:?}");
    updates.insert(0, first["data"]["orderStatusChanged"].clone());
    check_story(&updates)?;
    kernel.stop().await
}

async fn every_limit_is_configurable_and_enforced(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(
        &db,
        &[
            (config::GRAPHQL_MAX_DEPTH, "4"),
            (config::GRAPHQL_MAX_COMPLEXITY, "120"),
            (config::GRAPHQL_MAX_PAGE_SIZE, "20"),
            (config::GRAPHQL_MAX_ALIASES, "3"),
            (config::GRAPHQL_MAX_BATCH, "2"),
            (config::GRAPHQL_INTROSPECTION, "false"),
            (config::GRAPHIQL, "false"),
            (config::MAX_REQUEST_BYTES, "4096"),
        ],
    )
    .await?;
    // Started now: stopping a kernel closes the test database's pool.
    let open = RunningKernel::start(&db, &[]).await?;
    let refused = |body: &Value, code: &str| error_code(body) == Some(code);

    // Depth: 4 levels pass, 5 do not.
    let ok = kernel
        .graphql(
            "{ products(first: 2) { edges { node { id } } } }",
            json!({}),
        )
        .await?;
    ensure!(ok.get("errors").is_none(), "{ok}");
    let deep = kernel
        .graphql(
            "{ products(first: 2) { edges { node { price { amount } } } } }",
            json!({}),
        )
        .await?;
    ensure!(refused(&deep, "INVALID_QUERY"), "{deep}");
    ensure!(
        deep["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("nested too deep"),
        "{deep}"
    );

    // Complexity counts each node of a page: 20 nodes of 6 fields is too much.
    let cheap = kernel
        .graphql(
            "{ products(first: 2) { edges { node { id sku name } } } }",
            json!({}),
        )
        .await?;
    ensure!(cheap.get("errors").is_none(), "{cheap}");
    let costly = kernel
        .graphql(
            "{ products(first: 20) { edges { node { id sku name active version createdAt } } } }",
            json!({}),
        )
        .await?;
    ensure!(refused(&costly, "INVALID_QUERY"), "{costly}");
    ensure!(
        costly["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("complex"),
        "{costly}"
    );

    // Page size.
    let page = kernel
        .graphql("{ products(first: 21) { totalCount } }", json!({}))
        .await?;
    ensure!(
        refused(&page, "INVALID_INPUT") && page["errors"][0]["extensions"]["field"] == "first",
        "{page}"
    );
    ensure!(
        kernel
            .graphql("{ products(first: 20) { totalCount } }", json!({}))
            .await?
            .get("errors")
            .is_none()
    );

    // Aliases: three pass, four do not.
    let three = kernel
        .graphql(
            "{ a: eventLogHead b: eventLogHead c: eventLogHead }",
            json!({}),
        )
        .await?;
    ensure!(three.get("errors").is_none(), "{three}");
    let four = kernel
        .graphql(
            "{ a: eventLogHead b: eventLogHead c: eventLogHead d: eventLogHead }",
            json!({}),
        )
        .await?;
    ensure!(refused(&four, "INVALID_QUERY"), "{four}");

    // Batches: two operations pass, three do not.
    let batch = |n: usize| {
        json!(
            (0..n)
                .map(|_| json!({ "query": "{ eventLogHead }" }))
                .collect::<Vec<_>>()
        )
    };
    let two = kernel
        .http
        .post(kernel.url("/graphql"))
        .bearer_auth(&kernel.admin)
        .json(&batch(2))
        .send()
        .await?;
    ensure!(two.status() == 200);
    ensure!(
        two.json::<Value>()
            .await?
            .as_array()
            .is_some_and(|a| a.len() == 2)
    );
    let three = kernel
        .http
        .post(kernel.url("/graphql"))
        .bearer_auth(&kernel.admin)
        .json(&batch(3))
        .send()
        .await?;
    ensure!(three.status() == 400);
    ensure!(refused(&three.json::<Value>().await?, "INVALID_QUERY"));

    // Introspection off: __schema and __type answer nothing.
    let schema = kernel
        .graphql("{ __schema { queryType { name } } }", json!({}))
        .await?;
    ensure!(schema["data"]["__schema"].is_null(), "{schema}");
    let named = kernel
        .graphql("{ __type(name: \"Order\") { name } }", json!({}))
        .await?;
    ensure!(named["data"]["__type"].is_null(), "{named}");

    // Body size, and GraphiQL off.
    let huge = json!({ "query": format!("{{ eventLogHead }} # {}", "x".repeat(8192)) });
    let answer = kernel
        .http
        .post(kernel.url("/graphql"))
        .bearer_auth(&kernel.admin)
        .json(&huge)
        .send()
        .await?;
    ensure!(
        answer.status() == 413,
        "oversized body: {}",
        answer.status()
    );
    let ide = kernel.http.get(kernel.url("/graphql")).send().await?;
    ensure!(ide.status() == 405, "GraphiQL: {}", ide.status());
    kernel.stop().await?;

    // The defaults: introspection and GraphiQL on.
    let schema = open
        .graphql("{ __schema { queryType { name } } }", json!({}))
        .await?;
    ensure!(
        schema["data"]["__schema"]["queryType"]["name"] == "Query",
        "{schema}"
    );
    ensure!(open.http.get(open.url("/graphql")).send().await?.status() == 200);
    open.stop().await
}

async fn bad_input_is_refused_with_its_field_named(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let product = shop::stocked_product(&kernel, 5).await?;
    let (_, made) = kernel
        .graphql_as(
            Some(&kernel.customer_token(Uuid::now_v7())?),
            CREATE_CART,
            json!({ "input": { "items": [{ "productId": product, "quantity": 1 }] } }),
        )
        .await?;
    let cart = made["data"]["createCart"]["cart"]["id"].clone();
    let long = "x".repeat(1_000);
    let create_product = "mutation ($sku: String!, $name: String!, $amount: Decimal!, $currency: String!) { createProduct(input: { sku: $sku, name: $name, price: { amount: $amount, currency: $currency } }) { errors { field code message } } }";
    let product_input = |sku: &str, name: &str, amount: &str, currency: &str| json!({ "sku": sku, "name": name, "amount": amount, "currency": currency });
    let place = |address: Value, method: &str| json!({ "cart": cart, "address": address, "method": method });
    let place_order = "mutation ($cart: UUID!, $address: AddressInput!, $method: String!) { placeOrder(input: { cartId: $cart, paymentMethod: $method, shippingAddress: $address }) { errors { field code message } } }";
    // (what, document, variables, payload field or None for a top-level error, the field blamed)
    let cases: Vec<(&str, &str, Value, Option<&str>, &str)> = vec![
        (
            "more decimals than EUR has",
            create_product,
            product_input("A-1", "Pot", "1.001", "EUR"),
            Some("createProduct"),
            "amount",
        ),
        (
            "negative price",
            create_product,
            product_input("A-2", "Pot", "-1", "EUR"),
            Some("createProduct"),
            "amount",
        ),
        (
            "unknown currency",
            create_product,
            product_input("A-3", "Pot", "1", "EURO"),
            Some("createProduct"),
            "currency",
        ),
        (
            "empty name",
            create_product,
            product_input("A-4", " ", "1", "EUR"),
            Some("createProduct"),
            "name",
        ),
        (
            "oversized name",
            create_product,
            product_input("A-5", &long, "1", "EUR"),
            Some("createProduct"),
            "name",
        ),
        (
            "empty SKU",
            create_product,
            product_input("", "Pot", "1", "EUR"),
            Some("createProduct"),
            "sku",
        ),
        (
            "country not ISO 3166",
            place_order,
            place(
                json!({ "name": "A", "line1": "x", "city": "x", "postalCode": "1", "country": "Germany" }),
                "tok_visa",
            ),
            Some("placeOrder"),
            "shippingAddress.country",
        ),
        (
            "oversized payment method",
            place_order,
            place(shop::address("DE"), &long),
            Some("placeOrder"),
            "paymentMethod",
        ),
        (
            "quantity past a line's bound",
            "mutation ($cart: UUID!, $product: UUID!) { upsertCartItems(cartId: $cart, items: [{ productId: $product, quantity: 1000 }]) { errors { field code message } } }",
            json!({ "cart": cart, "product": product }),
            Some("upsertCartItems"),
            "items.quantity",
        ),
        (
            "session id too long",
            CREATE_CART,
            json!({ "input": { "sessionId": long } }),
            Some("createCart"),
            "sessionId",
        ),
        (
            "reservation already expired",
            "mutation ($id: UUID!) { reserveInventory(productId: $id, quantity: 1, ttlSeconds: -5) { errors { field code message } } }",
            json!({ "id": product }),
            Some("reserveInventory"),
            "ttlSeconds",
        ),
        (
            "page size 0",
            "{ events(first: 0) { totalCount } }",
            json!({}),
            None,
            "first",
        ),
        (
            "not a cursor",
            "{ orders(after: \"junk\") { totalCount } }",
            json!({}),
            None,
            "after",
        ),
        (
            "hours not positive",
            "{ abandonedCarts(hours: 0) { totalCount } }",
            json!({}),
            None,
            "hours",
        ),
    ];
    for (what, document, variables, payload, field) in cases {
        let answer = kernel.graphql(document, variables).await?;
        let (code, blamed) = match payload {
            Some(payload) => {
                let error = &answer["data"][payload]["errors"][0];
                (error["code"].clone(), error["field"].clone())
            }
            None => {
                let error = &answer["errors"][0]["extensions"];
                (error["code"].clone(), error["field"].clone())
            }
        };
        ensure!(code == "INVALID_INPUT", "{what}: {answer}");
        ensure!(
            blamed.as_str().is_some_and(|f| f.starts_with(field)),
            "{what}: blamed {blamed}, expected {field}: {answer}"
        );
    }
    // A value of the wrong type never reaches a resolver.
    let typed = kernel
        .graphql("{ order(id: \"nope\") { id } }", json!({}))
        .await?;
    ensure!(error_code(&typed) == Some("INVALID_QUERY"), "{typed}");
    let typed = kernel
        .graphql(
            "query ($s: OrderStatus) { orders(status: $s) { totalCount } }",
            json!({ "s": "LOST" }),
        )
        .await?;
    ensure!(error_code(&typed) == Some("INVALID_QUERY"), "{typed}");
    kernel.stop().await
}

/// A small deterministic generator (xorshift), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Documents of every shape the API has, to mutate.
const SEEDS: &[&str] = &[
    "{ products(first: 5) { totalCount edges { cursor node { id sku price { amount currency } inventory { available } } } pageInfo { hasNextPage endCursor } } }",
    "query ($id: UUID!) { order(id: $id) { id status lines { sku quantity } saga { status steps { name status } } events { eventType } } }",
    "query ($after: String) { events(first: 3, after: $after) { edges { cursor node { eventType data } } } }",
    "mutation ($input: CreateProductInput!) { createProduct(input: $input) { product { id } errors { field code message } } }",
    "mutation ($input: CreateCartInput!) { createCart(input: $input) { cart { id lines { quantity } } errors { code } } }",
    "mutation ($id: UUID!, $delta: Int!) { adjustInventory(input: { productId: $id, delta: $delta, reason: \"fuzz\" }) { errors { code } } }",
    "query { abandonedCarts(hours: 1.5) { totalCount abandonmentRate edges { node { cartId } } } }",
    "fragment P on Product { id name } query { products { edges { node { ...P } } } }",
];

/// Hostile values for variables.
fn hostile_value(rng: &mut Rng) -> Value {
    match rng.below(14) {
        0 => json!(null),
        1 => json!("x".repeat(rng.below(100_000))),
        2 => json!(i64::MAX),
        3 => json!(-1),
        4 => json!(1e308),
        5 => json!("1e400"),
        6 => json!("NaN"),
        7 => json!([[[[[[[[[[1]]]]]]]]]]),
        8 => {
            json!({ "sku": "\u{0000}\u{202e}", "name": "", "price": { "amount": "-0.001", "currency": "XXXX" } })
        }
        9 => json!({ "amount": "99999999999999999999999999999.99", "currency": "EUR" }),
        10 => json!(Uuid::now_v7()),
        11 => json!("00000000-0000-0000-0000-00000000000g"),
        12 => {
            json!({ "items": (0..500).map(|i| json!({ "productId": Uuid::nil(), "quantity": i })).collect::<Vec<_>>() })
        }
        _ => json!(true),
    }
}

/// A seed document, damaged.
fn hostile_document(rng: &mut Rng) -> String {
    let mut text: Vec<char> = rng.pick(SEEDS).chars().collect();
    for _ in 0..=rng.below(4) {
        let at = rng.below(text.len() + 1);
        match rng.below(7) {
            0 => {
                text.truncate(at);
            }
            1 => {
                let junk = *rng.pick(&[
                    '{', '}', '(', ')', '$', '"', '\\', '#', '@', ':', '!', '\u{fffd}',
                ]);
                text.insert(at.min(text.len()), junk);
            }
            2 if at < text.len() => {
                text.remove(at);
            }
            3 => {
                let alias: Vec<char> = " a: eventLogHead b: eventLogHead".chars().collect();
                text.splice(at.min(text.len())..at.min(text.len()), alias);
            }
            4 => {
                let start = rng.below(text.len());
                let end = (start + rng.below(40)).min(text.len());
                let copy: Vec<char> = text[start..end].to_vec();
                text.splice(at.min(text.len())..at.min(text.len()), copy);
            }
            5 => {
                let directive: Vec<char> = " @include(if: $nope) @skip(if: true)".chars().collect();
                text.splice(at.min(text.len())..at.min(text.len()), directive);
            }
            _ => {}
        }
    }
    text.into_iter().collect()
}

async fn hostile_documents_and_bodies_never_break_the_server(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let send = |body: reqwest::Body, content_type: &'static str| {
        kernel
            .http
            .post(kernel.url("/graphql"))
            .bearer_auth(&kernel.admin)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let acceptable = [200u16, 400, 413, 415];
    let mut fixed: Vec<(String, &'static str)> = vec![
        (String::new(), "application/json"),
        ("{".into(), "application/json"),
        ("null".into(), "application/json"),
        ("[]".into(), "application/json"),
        ("{\"query\": 42}".into(), "application/json"),
        ("{\"query\": \"{ eventLogHead }\", \"variables\": [1, 2]}".into(), "application/json"),
        ("{\"query\": \"{ eventLogHead }\", \"operationName\": \"nope\"}".into(), "application/json"),
        ("\u{feff}{\"query\": \"{ eventLogHead }\"}".into(), "application/json"),
        ("query=%7B%7D".into(), "application/x-www-form-urlencoded"),
        ("{ eventLogHead }".into(), "text/plain"),
        (format!("{{\"query\": \"{}\"}}", "{ a ".repeat(3_000)), "application/json"),
        (format!("{{\"query\": \"{}{}\"}}", "{".repeat(10_000), "}".repeat(10_000)), "application/json"),
        (format!("{{\"query\": \"{{ eventLogHead }}\", \"variables\": {}{}}}", "[".repeat(5_000), "]".repeat(5_000)), "application/json"),
        (format!("{{\"query\": \"query {} {{ eventLogHead }}\"}}", "($a: Int)".repeat(500)), "application/json"),
        (format!("{{\"query\": \"{{ eventLogHead {} }}\"}}", "@skip(if: false) ".repeat(2_000)), "application/json"),
        ("{\"query\": \"fragment A on Query { ...B } fragment B on Query { ...A } { ...A }\"}".into(), "application/json"),
        ("{\"query\": \"subscription { orderStatusChanged(orderId: \\\"00000000-0000-0000-0000-000000000000\\\") { cursor } }\"}".into(), "application/json"),
    ];
    fixed.push((
        String::from_utf8_lossy(&[0xff, 0xfe, 0x00, 0x7b]).into_owned(),
        "application/json",
    ));
    for (body, content_type) in fixed {
        let preview: String = body.chars().take(60).collect();
        let response = send(body.into(), content_type).await?;
        let status = response.status().as_u16();
        ensure!(
            acceptable.contains(&status),
            "{preview:?} answered {status}"
        );
    }
    // Errors never echo a huge document back.
    let long = json!({ "query": format!("{{ eventLogHead }} {}", "x".repeat(100_000)) });
    let answer: Value = send(long.to_string().into(), "application/json")
        .await?
        .json()
        .await?;
    let message = answer["errors"][0]["message"].as_str().unwrap_or_default();
    ensure!(
        !message.is_empty() && message.len() < 1_000,
        "{} characters",
        message.len()
    );
    // Bytes that are not UTF-8 at all.
    let response = send(
        vec![0xc3, 0x28, 0xa0, 0xa1, 0xff].into(),
        "application/json",
    )
    .await?;
    ensure!(acceptable.contains(&response.status().as_u16()));

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..300 {
        let document = hostile_document(&mut rng);
        let mut variables = serde_json::Map::new();
        for name in ["id", "input", "after", "delta", "nope"] {
            if rng.below(3) > 0 {
                variables.insert(name.into(), hostile_value(&mut rng));
            }
        }
        let body = json!({ "query": document, "variables": variables }).to_string();
        let response = send(body.into(), "application/json").await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        ensure!(
            acceptable.contains(&status),
            "round {round}: {status} for {document:?} {variables:?}: {text}"
        );
        if status == 200 {
            let answer: Value = serde_json::from_str(&text)
                .with_context(|| format!("round {round}: not JSON: {text}"))?;
            ensure!(
                answer.get("data").is_some() || answer.get("errors").is_some(),
                "{answer}"
            );
            if let Some(errors) = answer["errors"].as_array() {
                for error in errors {
                    ensure!(
                        error["extensions"]["code"].is_string(),
                        "round {round}: an error without a code: {error}"
                    );
                    ensure!(
                        error["extensions"]["code"] != "INTERNAL",
                        "round {round}: {error}"
                    );
                }
            }
        }
    }
    // Hostile WebSocket traffic: garbage frames and unknown messages close
    // that socket or are ignored; the server keeps serving.
    let admin_socket =
        |protocol| Socket::connect(&kernel, protocol, json!({ "token": kernel.admin }));
    for protocol in [Protocol::TransportWs, Protocol::LegacyWs] {
        let mut socket = admin_socket(protocol)
            .await?
            .map_err(|e| anyhow::anyhow!("{protocol:?}: admin socket refused: {e}"))?;
        for frame in [
            "not json",
            "{\"type\": \"nope\"}",
            "{\"type\": \"subscribe\", \"id\": 1}",
            "[]",
        ] {
            let _ = socket.stream.send(Message::Text(frame.into())).await;
        }
        let _ = socket
            .stream
            .send(Message::Binary(vec![0u8; 64].into()))
            .await;
    }
    // A message past the request size limit closes its socket.
    let mut socket = admin_socket(Protocol::TransportWs)
        .await?
        .map_err(|e| anyhow::anyhow!("admin socket refused: {e}"))?;
    let oversized =
        json!({ "id": "big", "type": "subscribe", "payload": { "query": "x".repeat(2 << 20) } });
    let _ = socket.send(oversized).await;
    let answer = socket.receive().await?;
    ensure!(answer.is_err(), "an oversized message was read");
    let health = kernel.http.get(kernel.url("/health")).send().await?;
    ensure!(
        health.status() == 200,
        "the server is unwell after the fuzzing"
    );
    let still = kernel.graphql("{ eventLogHead }", json!({})).await?;
    ensure!(still["data"]["eventLogHead"].is_string(), "{still}");
    kernel.stop().await
}

/// Everything a customer can ask of their own order's record.
const ORDER_RECORD: &str = "query ($id: UUID!) { order(id: $id) { status reason
    events { eventType data actor correlationId causationId }
    saga { status reason currentStep steps { name kind plugin status attempts error } } } }";

async fn customers_see_no_internal_references_in_their_orders(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let shop = shop::open(&kernel, 5).await?;
    let customer = Uuid::now_v7();
    let token = kernel.customer_token(customer)?;
    let confirmed = customer_order(&kernel, &token, shop.product).await?;
    // Declined in the provider's own words, on two lines.
    let declined =
        customer_order_paid_with(&kernel, &token, shop.product, "tok_decline_multiline").await?;

    let settled = async |order_id: Uuid, status: &str| -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let body = kernel
                .graphql(ORDER_RECORD, json!({ "id": order_id }))
                .await?;
            let saga = &body["data"]["order"]["saga"]["status"];
            if body["data"]["order"]["status"] == status
                && (saga == "COMPLETED" || saga == "COMPENSATED")
            {
                return Ok(body);
            }
            ensure!(tokio::time::Instant::now() < deadline, "{body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let admin_confirmed = settled(confirmed, "CONFIRMED").await?;
    let admin_declined = settled(declined, "FAILED").await?;

    // What an admin sees: the references, the actors, the provider's words.
    let internal: Vec<String> = {
        let mut found = Vec::new();
        let text = format!("{admin_confirmed}{admin_declined}");
        for marker in ["pay_", "shp_", "saga-runner:", "Your card was declined"] {
            ensure!(text.contains(marker), "admins see {marker}: {text}");
            found.push(marker.to_string());
        }
        found.push("admin:".to_string());
        for event in admin_confirmed["data"]["order"]["events"]
            .as_array()
            .into_iter()
            .flatten()
        {
            for reservation in event["data"]["reservations"]
                .as_array()
                .into_iter()
                .flatten()
            {
                found.push(
                    reservation["reservation_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
            }
        }
        ensure!(found.len() > 5, "admins see reservation ids: {found:?}");
        found
    };

    for (order_id, status) in [(confirmed, "CONFIRMED"), (declined, "FAILED")] {
        let (code, body) = kernel
            .graphql_as(Some(&token), ORDER_RECORD, json!({ "id": order_id }))
            .await?;
        ensure!(code == 200 && body.get("errors").is_none(), "{body}");
        let order = &body["data"]["order"];
        ensure!(order["status"] == status, "{body}");
        let text = body.to_string();
        for marker in &internal {
            ensure!(
                !text.contains(marker.as_str()),
                "the customer sees {marker:?}: {body}"
            );
        }
        for event in order["events"].as_array().context("events")? {
            ensure!(
                event["actor"].is_null()
                    && event["correlationId"].is_null()
                    && event["causationId"].is_null(),
                "{event}"
            );
        }
        ensure!(
            order["saga"]["steps"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|step| step["plugin"].is_null()),
            "{body}"
        );
    }
    let (_, body) = kernel
        .graphql_as(Some(&token), ORDER_RECORD, json!({ "id": declined }))
        .await?;
    let order = &body["data"]["order"];
    ensure!(
        order["reason"] == "payment declined" && order["saga"]["reason"] == "payment declined",
        "a short reason: {body}"
    );
    let payment = order["saga"]["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|step| step["name"] == "payment")
        .cloned()
        .unwrap_or_default();
    ensure!(payment["error"] == "payment declined", "{payment}");
    let failed = order["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|event| event["eventType"] == "Failed")
        .cloned()
        .unwrap_or_default();
    ensure!(
        failed["data"] == json!({ "reason": "payment declined" }),
        "{failed}"
    );
    kernel.stop().await
}

async fn a_page_of_nested_fields_costs_a_bounded_number_of_reads(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    const PRODUCTS: usize = 40;
    const ORDERS: usize = 40;
    let events = Arc::new(CountingEvents::new(db.event_store()));
    let views = Arc::new(CountingViews::new(db.database.view_store()));
    let commerce = Commerce::new(events.clone(), views.clone());
    let projector = Projector::new(events.clone(), views.clone());
    let plugins_dir = tempfile::tempdir()?;
    let registry = Arc::new(PluginRegistry::open(
        plugins_dir.path(),
        EngineConfig::default(),
    )?);
    let sagas = Sagas::new(commerce.clone(), db.database.saga_store());
    let adapters = Adapters {
        event_store: events.clone(),
        commerce: commerce.clone(),
        carts: Carts::new(
            commerce.clone(),
            Arc::new(EmbeddedCartStore::new()),
            CartLimits::default(),
        ),
        cart_activity: db.database.cart_activity(),
        projector: projector.clone(),
        plugins: Plugins::new(commerce.clone(), registry),
        sagas: sagas.clone(),
        live: LiveUpdates::new(Duration::from_secs(1)),
        guests: GuestSessions::off(),
        metrics: Default::default(),
        maintenance: db.database.maintenance(),
    };
    let limits = GraphqlLimits::default();
    let schema = build_schema(adapters, limits);

    let context = CommandContext {
        actor: Some("test".into()),
        correlation_id: None,
    };
    let customer = Uuid::now_v7();
    let mut products = Vec::new();
    for index in 0..PRODUCTS {
        let created = commerce
            .create_product(
                NewProduct {
                    sku: format!("SKU-{index}-{}", Uuid::now_v7().simple()),
                    name: "Mug".into(),
                    price: Money::new("4.50".parse()?, Currency::parse("EUR")?)?,
                    active: true,
                },
                &context,
            )
            .await?;
        commerce
            .adjust_inventory(created.id, 100, "stock", None, &context)
            .await?;
        products.push(created.id);
    }
    let mut last_saga = None;
    for index in 0..ORDERS {
        let order = commerce
            .place_order(
                PlaceOrderInput {
                    customer_id: customer,
                    lines: vec![(products[index % PRODUCTS], 1)],
                    shipping_address: berlin(),
                    payment_method: "tok_visa".into(),
                    idempotency_key: None,
                    email: None,
                },
                &context,
            )
            .await?;
        last_saga = Some(sagas.start_for_order(order.id, &context).await?);
    }
    // Readable first: another test's open transaction may hold the log's
    // readable head back for a moment, and the orders come from the
    // projection.
    let started = events
        .read_streams(&[last_saga.context("a saga")?])
        .await?
        .last()
        .map(|event| event.position)
        .context("the last saga's events")?;
    wait_until_readable(events.as_ref(), started).await?;
    projector.catch_up().await?;

    let run = async |query: &str, principal: Principal| -> anyhow::Result<(Value, u64, u64)> {
        let (streams, stock) = (
            events.stream_reads(),
            views.inventory_reads.load(Ordering::SeqCst),
        );
        let response = schema
            .execute(async_graphql::Request::new(query).data(principal))
            .await;
        ensure!(response.errors.is_empty(), "{:?}", response.errors);
        Ok((
            response.data.into_json()?,
            events.stream_reads() - streams,
            views.inventory_reads.load(Ordering::SeqCst) - stock,
        ))
    };

    // A customer's orders, each with its saga and its events.
    let (data, stream_reads, _) = run(
        "{ orders(first: 500) { edges { node { id saga { status } events { id } } } } }",
        Principal::customer(customer),
    )
    .await?;
    let orders = data["orders"]["edges"].as_array().context("orders")?;
    ensure!(orders.len() == ORDERS, "{data}");
    ensure!(
        orders
            .iter()
            .all(|edge| edge["node"]["saga"]["status"] == "RUNNING"
                && edge["node"]["events"]
                    .as_array()
                    .is_some_and(|e| e.len() == 1)),
        "{data}"
    );
    // Batches (the sagas, the events) may be split by the loader's 1 ms
    // window on a busy machine, never per order: without batching this is
    // two reads per order (80).
    ensure!(
        stream_reads <= ORDERS as u64 / 4,
        "{ORDERS} orders' sagas and events in a few batches, not a read each: {stream_reads}"
    );

    // The catalog with each product's stock.
    let (data, _, stock_reads) = run(
        "{ products(first: 500) { edges { node { id inventory { available } } } } }",
        Principal::customer(customer),
    )
    .await?;
    let listed = data["products"]["edges"].as_array().context("products")?;
    ensure!(listed.len() >= PRODUCTS, "{data}");
    ensure!(
        listed
            .iter()
            .filter(|edge| edge["node"]["inventory"]["available"] == 100)
            .count()
            == PRODUCTS,
        "{data}"
    );
    ensure!(
        stock_reads <= PRODUCTS as u64 / 4,
        "{PRODUCTS} products' stock in a few batches, not a read each: {stock_reads}"
    );

    // A cart of many lines: its products are read once to check them and
    // once to price them, not once per line (20 reads for these 10).
    let items: Vec<Value> = products
        .iter()
        .take(10)
        .map(|id| json!({ "productId": id, "quantity": 2 }))
        .collect();
    let before = events.stream_reads();
    let response = schema
        .execute(
            async_graphql::Request::new(
                "mutation ($input: CreateCartInput!) { createCart(input: $input) { \
                 cart { id lines { quantity } } errors { code message } } }",
            )
            .variables(async_graphql::Variables::from_json(
                json!({ "input": { "items": items } }),
            ))
            .data(Principal::customer(customer)),
        )
        .await;
    ensure!(response.errors.is_empty(), "{:?}", response.errors);
    let data = response.data.into_json()?;
    ensure!(
        data["createCart"]["cart"]["lines"]
            .as_array()
            .is_some_and(|lines| lines.len() == 10),
        "{data}"
    );
    let cart_reads = events.stream_reads() - before;
    ensure!(
        cart_reads <= 2,
        "a cart of 10 lines checked and priced in {cart_reads} stream reads"
    );

    // Nested lists count against the complexity limit per node: each
    // order's events as ten, so a page of 500 orders' event ids costs more
    // than 5,000 and a limit of 5,000 refuses it.
    let tight = build_schema(
        Adapters {
            event_store: events.clone(),
            commerce: commerce.clone(),
            carts: Carts::new(
                commerce.clone(),
                Arc::new(EmbeddedCartStore::new()),
                CartLimits::default(),
            ),
            cart_activity: db.database.cart_activity(),
            projector: projector.clone(),
            plugins: Plugins::new(
                commerce.clone(),
                Arc::new(PluginRegistry::open(
                    plugins_dir.path(),
                    EngineConfig::default(),
                )?),
            ),
            sagas,
            live: LiveUpdates::new(Duration::from_secs(1)),
            guests: GuestSessions::off(),
            metrics: Default::default(),
            maintenance: db.database.maintenance(),
        },
        GraphqlLimits {
            max_complexity: 5_000,
            ..limits
        },
    );
    let refused = tight
        .execute(
            async_graphql::Request::new(
                "{ orders(first: 500) { edges { node { events { id } } } } }",
            )
            .data(Principal::customer(customer)),
        )
        .await;
    ensure!(
        refused
            .errors
            .iter()
            .any(|e| e.message.to_lowercase().contains("complex")),
        "{:?}",
        refused.errors
    );
    Ok(())
}

/// The value of the series `series` (name and labels, as encoded) in the
/// metrics text, if it is there.
fn series_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.split(' ').next()?.parse().ok())
}

/// One order from cart to CONFIRMED, then `/metrics` of the kernel that
/// took it (each test kernel has a registry of its own, so the counts are
/// this order's alone): the seed's names with real values.
async fn metrics_show_an_order_from_cart_to_confirmed(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let shop = shop::open(&kernel, 5).await?;
    let token = kernel.customer_token(Uuid::now_v7())?;
    let order = customer_order(&kernel, &token, shop.product).await?;
    confirmed_order_events(&kernel, order).await?;
    // A document naming a field the schema lacks is labelled as unknown,
    // never by the client's word.
    let (_, unknown) = kernel
        .graphql_as(Some(&token), "{ noSuchField123 }", json!({}))
        .await?;
    ensure!(unknown["errors"].is_array(), "{unknown}");

    let metrics = kernel.metrics().await?;
    let value = |series: &str| series_value(&metrics, series);
    for (series, expected) in [
        ("commerce_orders_total{status=\"PENDING\"}", 1.0),
        ("commerce_orders_total{status=\"INVENTORY_RESERVED\"}", 1.0),
        ("commerce_orders_total{status=\"PAID\"}", 1.0),
        ("commerce_orders_total{status=\"SHIPPED\"}", 1.0),
        ("commerce_orders_total{status=\"CONFIRMED\"}", 1.0),
        (
            "commerce_saga_duration_seconds_count{outcome=\"COMPLETED\"}",
            1.0,
        ),
        (
            "commerce_cart_operations_total{operation=\"createCart\"}",
            1.0,
        ),
        (
            "commerce_cart_operations_total{operation=\"placeOrder\"}",
            1.0,
        ),
        (
            "commerce_graphql_request_duration_seconds_count{operation=\"mutation placeOrder\"}",
            1.0,
        ),
        (
            "commerce_graphql_request_duration_seconds_count{operation=\"query (unknown)\"}",
            1.0,
        ),
        (
            concat!(
                "commerce_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\"}"
            ),
            1.0,
        ),
    ] {
        ensure!(
            value(series) == Some(expected),
            "{series} is {:?}, not {expected}:\n{metrics}",
            value(series)
        );
    }
    ensure!(!metrics.contains("noSuchField123"), "{metrics}");
    // There from the start, at 0, so a rate sees the first failure.
    ensure!(value("commerce_orders_total{status=\"FAILED\"}") == Some(0.0));
    ensure!(value("commerce_saga_duration_seconds_count{outcome=\"COMPENSATED\"}") == Some(0.0));
    let sum = value("commerce_saga_duration_seconds_sum{outcome=\"COMPLETED\"}").unwrap_or(0.0);
    ensure!(sum > 0.0 && sum < 20.0, "the saga took {sum} s:\n{metrics}");
    // Every write of the order and its saga was an append.
    let appends = value("commerce_event_store_append_duration_seconds_count").unwrap_or(0.0);
    ensure!(appends >= 5.0, "{appends} appends:\n{metrics}");
    for series in [
        "commerce_plugin_invocations_total{plugin=\"payment\"}",
        "commerce_plugin_invocations_total{plugin=\"shipping\"}",
    ] {
        ensure!(value(series) >= Some(1.0), "{series}:\n{metrics}");
    }
    // Refreshed at start and every 15 s; present from the first scrape.
    for series in [
        "commerce_sagas{status=\"RUNNING\"}",
        "commerce_sagas{status=\"PARKED\"}",
        "commerce_projection_lag_events{projection=\"orders\"}",
        "commerce_inventory_conflicts_total",
        "commerce_saga_write_retries_total",
        "commerce_sagas_parked_total{cause=\"compensation_failed\"}",
    ] {
        ensure!(value(series).is_some(), "{series} is missing:\n{metrics}");
    }
    ensure!(
        metrics.ends_with("# EOF\n"),
        "OpenMetrics text ends with EOF"
    );
    every_metric_the_deployment_uses_is_exported(&metrics)?;
    kernel.stop().await
}

/// Each `commerce_*` name in deploy/prometheus/alerts.yml and the Grafana
/// dashboard is a family in `metrics` (a sample name is the family's plus
/// `_total`, `_bucket`, `_count`, `_sum` or `_info`).
fn every_metric_the_deployment_uses_is_exported(metrics: &str) -> anyhow::Result<()> {
    let families: Vec<&str> = metrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    let exported = |name: &str| {
        families.iter().any(|family| {
            name.strip_prefix(family).is_some_and(|suffix| {
                ["", "_total", "_bucket", "_count", "_sum", "_info"].contains(&suffix)
            })
        })
    };
    for (file, text) in [
        (
            "alerts.yml",
            include_str!("../deploy/prometheus/alerts.yml"),
        ),
        (
            "alerts_test.yml",
            include_str!("../deploy/prometheus/alerts_test.yml"),
        ),
        (
            "commerce.json",
            include_str!("../deploy/grafana/dashboards/commerce.json"),
        ),
    ] {
        let mut rest = text;
        while let Some(start) = rest.find("commerce_") {
            let name: String = rest[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[start + name.len()..];
            ensure!(
                exported(&name),
                "{file} uses {name}, which /metrics does not have"
            );
        }
    }
    Ok(())
}

/// `/metrics` asks for the token wherever it is served; with a listener
/// of its own it leaves the API port.
async fn metrics_are_served_where_configured_and_to_the_token_only(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    for token in [None, Some("wrong-token-wrong-token")] {
        let mut request = kernel.http.get(kernel.url("/metrics"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        ensure!(response.status() == 401, "{token:?}: {}", response.status());
    }
    ensure!(kernel.metrics().await?.contains("commerce_build_info"));

    // A free port now, for the metrics listener. (The first kernel stops
    // last: stopping closes the suite's database.)
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let first = kernel;
    let kernel = RunningKernel::join(
        &first,
        &db,
        &[(config::METRICS_ADDR, metrics_addr.as_str())],
    )
    .await?;
    let unguarded = kernel
        .http
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .await?;
    ensure!(
        unguarded.status() == 401,
        "the token guards the listener too: {}",
        unguarded.status()
    );
    let on_api_port = kernel.http.get(kernel.url("/metrics")).send().await?;
    ensure!(on_api_port.status() == 404, "{}", on_api_port.status());
    let own = kernel
        .http
        .get(format!("http://{metrics_addr}/metrics"))
        .bearer_auth(support::kernel::TEST_METRICS_TOKEN)
        .send()
        .await?;
    ensure!(own.status() == 200, "{}", own.status());
    ensure!(
        own.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()?
            .starts_with("application/openmetrics-text"),
        "{:?}",
        own.headers()
    );
    kernel.stop().await?;
    first.stop().await
}

/// Orders and carts written straight into the read models on a day of 2001
/// (no other test writes there), one order and one cart just outside it:
/// `kpis` reports exactly them, on both backends.
async fn kpis_report_the_orders_and_carts_of_a_range(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    use commerce_kernel::carts::CartActivity;
    use commerce_kernel::domain::cart::{CartOwner, CartStatus};
    use commerce_kernel::domain::order::OrderStatus;
    use commerce_kernel::projections::{OrderView, ProjectionBatch, ProjectionName, ViewChange};

    let day = chrono::DateTime::parse_from_rfc3339("2001-03-04T00:00:00Z")?.to_utc();
    let at = |seconds: i64| day + chrono::Duration::seconds(seconds);
    let id_at = |time: chrono::DateTime<chrono::Utc>| {
        let millis = u64::try_from(time.timestamp_millis()).unwrap_or_default();
        Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            millis / 1000,
            u32::try_from(millis % 1000).unwrap_or_default() * 1_000_000,
        ))
    };
    let money = |amount: &str, currency: &str| -> anyhow::Result<_> {
        Ok(commerce_kernel::domain::money::Money::new(
            amount.parse()?,
            commerce_kernel::domain::money::Currency::parse(currency)?,
        )?)
    };
    // (placed at, seconds to its final status, status, total): 21 orders
    // that reached a final status, so that the 95th percentile by nearest
    // rank (the 20th of 21) is not the slowest.
    let mut orders = vec![
        (at(3_600), 1, OrderStatus::Confirmed, money("10.10", "EUR")?),
        (at(7_200), 2, OrderStatus::Confirmed, money("0.20", "EUR")?),
        (at(10_800), 3, OrderStatus::Confirmed, money("5.00", "USD")?),
        (at(14_400), 20, OrderStatus::Failed, money("99.00", "EUR")?),
        (
            at(14_500),
            100,
            OrderStatus::Cancelled,
            money("7.00", "EUR")?,
        ),
        // At the very start of the range: inside it.
        (at(0), 0, OrderStatus::Pending, money("1.00", "EUR")?),
        // The next day: outside the range.
        (
            at(86_400),
            1,
            OrderStatus::Confirmed,
            money("500.00", "EUR")?,
        ),
    ];
    for second in 4..=19 {
        orders.push((
            at(20_000 + second),
            second,
            OrderStatus::Confirmed,
            money("0.01", "EUR")?,
        ));
    }
    let changes = orders
        .iter()
        .map(|(placed, took, status, total)| {
            ViewChange::InsertOrder(Box::new(OrderView {
                order_id: id_at(*placed),
                customer_id: Uuid::now_v7(),
                status: *status,
                total: *total,
                reason: None,
                lines: Vec::new(),
                shipping_address: berlin(),
                payment_method: "card".into(),
                email: None,
                version: 1,
                created_at: *placed,
                updated_at: *placed + chrono::Duration::seconds(*took),
            }))
        })
        .collect::<Vec<_>>();
    let views = db.database.view_store();
    // In place, checkpoint unmoved: a batch from the orders' checkpoint to itself.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let checkpoint = views.checkpoint(ProjectionName::Orders).await?;
        let batch = ProjectionBatch {
            projection: ProjectionName::Orders,
            from: checkpoint,
            to: checkpoint,
            changes: changes.clone(),
        };
        if views.apply(&[batch]).await? {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "never applied");
    }
    let cart = |created: i64, idle_since: i64, checked_out: bool| CartActivity {
        cart_id: Uuid::now_v7(),
        owner: CartOwner::Customer(Uuid::now_v7()),
        status: if checked_out {
            CartStatus::CheckedOut
        } else {
            CartStatus::Open
        },
        version: 2,
        line_count: 1,
        created_at: at(created),
        updated_at: at(idle_since),
        expires_at: at(idle_since + 604_800),
        order_id: checked_out.then(Uuid::now_v7),
    };
    db.database
        .cart_activity()
        .record(&[
            cart(100, 200, true),
            cart(300, 400, true),
            cart(500, 600, false),
            cart(86_500, 86_600, false),
        ])
        .await?;

    let kernel = RunningKernel::start(&db, &[]).await?;
    let query = "query ($from: DateTime!, $to: DateTime!) { kpis(from: $from, to: $to) { \
        ordersPlaced ordersPerHour ordersByStatus { status count } revenue { amount currency } \
        sagaSuccessRate p95SagaDurationSeconds cartsCreated cartsCheckedOut cartsAbandoned \
        conversionRate cartAbandonmentRate } }";
    let range = json!({ "from": day.to_rfc3339(), "to": at(86_400).to_rfc3339() });
    let body = kernel.graphql(query, range.clone()).await?;
    let kpis = &body["data"]["kpis"];
    let count = |status: &str| {
        kpis["ordersByStatus"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|entry| entry["status"] == status)
            .map(|entry| entry["count"].clone())
    };
    ensure!(kpis["ordersPlaced"] == 22, "{body}");
    ensure!(
        count("CONFIRMED") == Some(json!(19))
            && count("FAILED") == Some(json!(1))
            && count("PENDING") == Some(json!(1))
            && count("CANCELLED") == Some(json!(1))
            && count("PAID") == Some(json!(0)),
        "{body}"
    );
    ensure!(
        kpis["revenue"]
            == json!([{ "amount": "10.46", "currency": "EUR" }, { "amount": "5.00", "currency": "USD" }]),
        "exact sums per currency, confirmed orders only: {body}"
    );
    let close =
        |value: &Value, expected: f64| value.as_f64().is_some_and(|v| (v - expected).abs() < 1e-9);
    ensure!(close(&kpis["ordersPerHour"], 22.0 / 24.0), "{body}");
    ensure!(close(&kpis["sagaSuccessRate"], 19.0 / 21.0), "{body}");
    // 21 final orders taking 1..=20 s and 100 s: the 20th is 20 s.
    ensure!(close(&kpis["p95SagaDurationSeconds"], 20.0), "{body}");
    ensure!(
        kpis["cartsCreated"] == 3 && kpis["cartsCheckedOut"] == 2 && kpis["cartsAbandoned"] == 1,
        "{body}"
    );
    ensure!(close(&kpis["conversionRate"], 2.0 / 3.0), "{body}");
    ensure!(close(&kpis["cartAbandonmentRate"], 1.0 / 3.0), "{body}");

    // A range with nothing in it: zeros, and no rates.
    let empty = kernel
        .graphql(
            query,
            json!({ "from": "1999-01-01T00:00:00Z", "to": "1999-01-02T00:00:00Z" }),
        )
        .await?;
    let nothing = &empty["data"]["kpis"];
    ensure!(
        nothing["ordersPlaced"] == 0
            && nothing["sagaSuccessRate"].is_null()
            && nothing["p95SagaDurationSeconds"].is_null()
            && nothing["conversionRate"].is_null()
            && nothing["revenue"] == json!([]),
        "{empty}"
    );
    // Bad ranges are refused with the field named.
    for (from, to) in [
        ("2001-03-05T00:00:00Z", "2001-03-04T00:00:00Z"),
        ("2001-03-04T00:00:00Z", "2001-03-04T00:00:00.5Z"),
        ("2001-01-01T00:00:00Z", "2003-01-01T00:00:00Z"),
    ] {
        let refused = kernel
            .graphql(query, json!({ "from": from, "to": to }))
            .await?;
        ensure!(error_code(&refused) == Some("INVALID_INPUT"), "{refused}");
    }
    kernel.stop().await
}

/// One trace follows an order: the storefront's `traceparent` header, the
/// request's and the GraphQL operation's spans, the order's events, the
/// saga's steps, the plugin calls, and the providers' requests, which carry
/// a `traceparent` of the same trace. An order placed without the header
/// starts a trace of its own, followed the same way.
async fn one_trace_follows_an_order_to_the_providers(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let collector = traces::collector();
    let kernel = RunningKernel::start(&db, &[]).await?;
    let shop = shop::open(&kernel, 5).await?;
    let token = kernel.customer_token(Uuid::now_v7())?;
    let (_, made) = kernel
        .graphql_as(
            Some(&token),
            CREATE_CART,
            json!({ "input": { "items": [{ "productId": shop.product, "quantity": 1 }] } }),
        )
        .await?;
    let cart = made["data"]["createCart"]["cart"]["id"].clone();
    let trace = Uuid::new_v4().simple().to_string();
    let caller_span = &Uuid::new_v4().simple().to_string()[..16];
    let placed: Value = kernel
        .http
        .post(kernel.url("/graphql"))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace}-{caller_span}-01"))
        .json(&json!({ "query": PLACE_ORDER, "variables": { "cart": cart, "address": shop::address("DE") } }))
        .send()
        .await?
        .json()
        .await?;
    let order: Uuid = serde_json::from_value(placed["data"]["placeOrder"]["order"]["id"].clone())
        .with_context(|| format!("{placed}"))?;
    let events = confirmed_order_events(&kernel, order).await?;
    let traced = |event: &Value| event["traceId"].as_str().map(str::to_string);
    ensure!(
        events
            .iter()
            .all(|event| traced(event).as_deref() == Some(trace.as_str())),
        "every event of the order is in the caller's trace: {events:#?}"
    );
    for (provider, headers) in [
        ("payments", shop.payments.traceparents()),
        ("shipping", shop.shipping.traceparents()),
    ] {
        ensure!(!headers.is_empty(), "{provider} saw no request");
        ensure!(
            headers
                .iter()
                .all(|header| header.starts_with(&format!("00-{trace}-"))
                    && !header.contains(caller_span)),
            "{provider} got the trace, each request from a span of the kernel's: {headers:?}"
        );
    }

    // The saga's drive span ends a moment after its last write.
    let wanted = ["request", "graphql", "saga", "saga_step", "plugin_call"];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = collector.spans_of(&trace);
        let names: BTreeSet<&str> = spans.iter().map(|span| span.name.as_str()).collect();
        if wanted.iter().all(|name| names.contains(name)) {
            break spans;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "not every one of {wanted:?} in {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(
        spans
            .iter()
            .any(|span| span.name == "request" && span.parent_span_id == caller_span),
        "the request continues the caller's span: {spans:#?}"
    );
    ensure!(
        spans.iter().any(|span| span.name == "graphql"
            && span.attributes.get("operation").map(String::as_str) == Some("mutation placeOrder")),
        "{spans:#?}"
    );
    for plugin in ["payment@1.0.0", "shipping@1.0.0"] {
        ensure!(
            spans.iter().any(|span| span.name == "plugin_call"
                && span.attributes.get("plugin").map(String::as_str) == Some(plugin)),
            "no call of {plugin} in the trace: {spans:#?}"
        );
    }
    // The provider's parent span is a plugin call of the trace.
    let payment_parent = shop.payments.traceparents()[0]
        .split('-')
        .nth(2)
        .unwrap_or_default()
        .to_string();
    ensure!(
        spans
            .iter()
            .any(|span| span.span_id == payment_parent && span.name == "plugin_call"),
        "{payment_parent} is not a plugin call of {spans:#?}"
    );

    // Without a traceparent: a trace of the kernel's own, followed alike.
    let seen = shop.payments.traceparents().len();
    let second = customer_order(&kernel, &token, shop.product).await?;
    let events = confirmed_order_events(&kernel, second).await?;
    let own = traced(&events[0]).context("the order's first event has no trace")?;
    ensure!(own != trace && own.len() == 32, "{own}");
    ensure!(
        events
            .iter()
            .all(|event| traced(event) == Some(own.clone())),
        "{events:#?}"
    );
    let later = &shop.payments.traceparents()[seen..];
    ensure!(
        !later.is_empty()
            && later
                .iter()
                .all(|header| header.starts_with(&format!("00-{own}-"))),
        "{later:?}"
    );

    // A kernel told not to trust callers starts its own trace regardless.
    let guarded =
        RunningKernel::join(&kernel, &db, &[("COMMERCE_TRUST_TRACEPARENT", "false")]).await?;
    let (_, made) = guarded
        .graphql_as(
            Some(&token),
            CREATE_CART,
            json!({ "input": { "items": [{ "productId": shop.product, "quantity": 1 }] } }),
        )
        .await?;
    let chosen = Uuid::new_v4().simple().to_string();
    let placed: Value = guarded
        .http
        .post(guarded.url("/graphql"))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{chosen}-{caller_span}-01"))
        .json(&json!({ "query": PLACE_ORDER, "variables": { "cart": made["data"]["createCart"]["cart"]["id"], "address": shop::address("DE") } }))
        .send()
        .await?
        .json()
        .await?;
    let third: Uuid = serde_json::from_value(placed["data"]["placeOrder"]["order"]["id"].clone())
        .with_context(|| format!("{placed}"))?;
    let events = confirmed_order_events(&guarded, third).await?;
    let kept = traced(&events[0]).context("no trace")?;
    ensure!(kept != chosen && kept != trace && kept != own, "{kept}");
    ensure!(
        events
            .iter()
            .all(|event| traced(event) == Some(kept.clone())),
        "{events:#?}"
    );
    guarded.stop().await?;
    kernel.stop().await
}

/// Waits until `order` is CONFIRMED; its events, as an admin sees them.
async fn confirmed_order_events(kernel: &RunningKernel, order: Uuid) -> anyhow::Result<Vec<Value>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let body = kernel
            .graphql(
                "query ($id: UUID!) { order(id: $id) { status events { eventType traceId } } }",
                json!({ "id": order }),
            )
            .await?;
        if body["data"]["order"]["status"] == "CONFIRMED" {
            let events: Vec<Value> =
                serde_json::from_value(body["data"]["order"]["events"].clone())?;
            ensure!(events.len() >= 5, "{body}");
            return Ok(events);
        }
        ensure!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const RECONCILE: &str =
    "mutation ($repair: Boolean!) { reconcileInventory(repair: $repair, olderThanSeconds: 0) {
    productsChecked eventsReplayed drift { productId kind reservationId detail }
    releasedReservations readModelRebuilt errors { code message } } }";

/// The runbook's inventory reconciliation: a clean shop has no drift. Then,
/// as a bug or a hand would leave them: an order that failed while its own
/// reservation stayed held, and the read model's stock edited behind the
/// events' back. Beside them, reservations that must never be touched: an
/// order in progress holding its stock, and another system's hold named
/// after an order that failed but does not list it. Both faults are found (and only reported
/// without `repair`); the repair releases the leaked reservation alone with
/// an event, by the admin, and rebuilds the read model, after which nothing
/// is found and the stock is right.
async fn inventory_reconciliation_finds_injected_drift_and_repairs_it(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    // No saga is defined: the orders written below stay as they are.
    let product = shop::stocked_product(&kernel, 10).await?;
    let reconcile = |repair: bool| {
        let kernel = &kernel;
        async move {
            let body = kernel
                .graphql(RECONCILE, json!({ "repair": repair }))
                .await?;
            let payload = body["data"]["reconcileInventory"].clone();
            ensure!(payload["errors"] == json!([]), "{body}");
            Ok::<_, anyhow::Error>(payload)
        }
    };
    let drift_gauge = |metrics: &str| series_value(metrics, "commerce_inventory_drift_products");

    let clean = reconcile(false).await?;
    ensure!(clean["drift"] == json!([]), "{clean}");
    ensure!(clean["productsChecked"] == 1, "{clean}");

    let (ended, going) = (Uuid::now_v7(), Uuid::now_v7());
    let (leaked, kept) = (Uuid::now_v7(), Uuid::now_v7());
    order_holding_stock(&db, ended, product, Some(leaked), 2, true).await?;
    order_holding_stock(&db, going, product, Some(kept), 1, false).await?;
    // An order that failed holding nothing, and another system's hold
    // under its name: not the order's own, so never released.
    let bare = Uuid::now_v7();
    order_holding_stock(&db, bare, product, None, 1, true).await?;
    let foreign = kernel
        .mutate(
            "reserveInventory",
            "mutation ($id: UUID!, $owner: String!) { reserveInventory(productId: $id, quantity: 1, owner: $owner) { reservation { id } errors { code message } } }",
            json!({ "id": product, "owner": format!("order:{bare}") }),
        )
        .await?;
    let foreign = foreign["reservation"]["id"].clone();
    ensure!(foreign.is_string(), "{foreign}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while stock(&kernel, product).await? != (10, 4) {
        ensure!(tokio::time::Instant::now() < deadline, "never projected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    edit_stock_row(&db, product, 7).await?;

    let found = reconcile(false).await?;
    let kinds: BTreeSet<(String, String)> = found["drift"]
        .as_array()
        .context("drift")?
        .iter()
        .map(|d| (d["kind"].to_string(), d["reservationId"].to_string()))
        .collect();
    ensure!(
        kinds
            == BTreeSet::from([
                ("\"READ_MODEL\"".to_string(), "null".to_string()),
                (
                    "\"LEAKED_RESERVATION\"".to_string(),
                    json!(leaked).to_string()
                ),
            ]),
        "{found}"
    );
    ensure!(
        found["drift"]
            .as_array()
            .is_some_and(|all| all.iter().all(|d| d["productId"] == json!(product))),
        "{found}"
    );
    ensure!(found["releasedReservations"] == json!([]) && found["readModelRebuilt"] == false);
    ensure!(drift_gauge(&kernel.metrics().await?) == Some(1.0));
    // Reporting changed nothing.
    ensure!(stock(&kernel, product).await? == (17, 4), "{found}");

    let repaired = reconcile(true).await?;
    ensure!(
        repaired["releasedReservations"] == json!([leaked]),
        "{repaired}"
    );
    ensure!(repaired["readModelRebuilt"] == true, "{repaired}");
    ensure!(drift_gauge(&kernel.metrics().await?) == Some(0.0));
    // The order in progress and the other system keep their stock.
    ensure!(stock(&kernel, product).await? == (10, 2));
    for held in [json!(kept), foreign] {
        let body = kernel
            .graphql(
                "query ($id: UUID!) { reservation(id: $id) { id } }",
                json!({ "id": held }),
            )
            .await?;
        ensure!(body["data"]["reservation"]["id"] == held, "{body}");
    }
    let after = reconcile(false).await?;
    ensure!(after["drift"] == json!([]), "{after}");
    // The release is an event of the stream, by the admin who repaired.
    let events = kernel
        .graphql(
            "query ($id: UUID!) { aggregateEvents(aggregateId: $id) { edges { node { eventType actor data } } } }",
            json!({ "id": inventory_stream(product) }),
        )
        .await?;
    let released = events["data"]["aggregateEvents"]["edges"]
        .as_array()
        .context("events")?
        .iter()
        .filter(|edge| edge["node"]["eventType"] == "ReservationReleased")
        .map(|edge| {
            (
                edge["node"]["data"]["reservation_id"].clone(),
                edge["node"]["actor"].clone(),
            )
        })
        .collect::<Vec<_>>();
    ensure!(
        released == vec![(json!(leaked), json!("admin:test-admin"))],
        "{events}"
    );
    kernel.stop().await
}

/// Writes, straight to the event store, an order of `quantity` units of
/// `product`, with a `reservation` holding them (placed, its stock
/// reserved), and with `failed` an end to it that, unlike the kernel's,
/// releases nothing.
async fn order_holding_stock(
    db: &TestDatabase,
    order: Uuid,
    product: Uuid,
    reservation: Option<Uuid>,
    quantity: u32,
    failed: bool,
) -> anyhow::Result<()> {
    use commerce_kernel::domain::inventory::{Inventory, InventoryEvent};
    use commerce_kernel::domain::order::{Order, OrderEvent, OrderLine, ReservedStock};
    use commerce_kernel::event_store::{AggregateRepository, EventMetadata};
    let store = db.event_store();
    let inventory = AggregateRepository::<Inventory>::new(Arc::clone(&store));
    let stream = inventory_stream(product);
    let version = inventory.load(stream).await?.version;
    if let Some(reservation) = reservation {
        inventory
            .append(
                stream,
                version,
                &[InventoryEvent::StockReserved {
                    product_id: product,
                    reservation_id: reservation,
                    owner: format!("order:{order}"),
                    quantity,
                    expires_at: None,
                }],
                EventMetadata::default(),
                None,
            )
            .await?;
    }
    let eur = Currency::parse("EUR")?;
    let price = Money::new("19.90".parse()?, eur)?;
    let total = Money::new(price.amount() * rust_decimal::Decimal::from(quantity), eur)?;
    let mut events = vec![OrderEvent::Placed {
        customer_id: Uuid::now_v7(),
        lines: vec![OrderLine {
            product_id: product,
            sku: "SKU".into(),
            name: "Teapot".into(),
            quantity,
            unit_price: price,
            line_total: total,
        }],
        total,
        shipping_address: berlin(),
        payment_method: "tok_visa".into(),
        idempotency_key: None,
        email: None,
    }];
    if let Some(reservation) = reservation {
        events.push(OrderEvent::InventoryReserved {
            reservations: vec![ReservedStock {
                product_id: product,
                reservation_id: reservation,
                quantity,
            }],
        });
    }
    if failed {
        events.push(OrderEvent::Failed {
            reason: "payment declined".into(),
        });
    }
    AggregateRepository::<Order>::new(store)
        .append(order, 0, &events, EventMetadata::default(), None)
        .await?;
    Ok(())
}

/// The product's stock row as the read model has it: on hand, reserved.
async fn stock(kernel: &RunningKernel, product: Uuid) -> anyhow::Result<(i64, i64)> {
    let body = kernel
        .graphql(
            "query ($id: UUID!) { inventory(productId: $id) { onHand reserved } }",
            json!({ "id": product }),
        )
        .await?;
    let row = &body["data"]["inventory"];
    Ok((
        row["onHand"].as_i64().context("onHand")?,
        row["reserved"].as_i64().context("reserved")?,
    ))
}

/// The inventory stream of a product (as the kernel names it).
fn inventory_stream(product: Uuid) -> Uuid {
    commerce_kernel::domain::inventory::Inventory::stream_id(product)
}

/// Adds `extra` to the product's on-hand stock in the read model's row,
/// behind the events' back.
async fn edit_stock_row(db: &TestDatabase, product: Uuid, extra: i64) -> anyhow::Result<()> {
    let statement =
        format!("UPDATE inventory_views SET on_hand = on_hand + {extra} WHERE product_id = $1");
    ensure!(
        db.execute(&statement, Some(product)).await? == 1,
        "no stock row for {product}"
    );
    Ok(())
}

const PRUNE: &str = "mutation ($dryRun: Boolean!) { pruneStore(dryRun: $dryRun) {
    dryRun idempotencyKeys finishedSagas cartActivity } }";

/// `pruneStore`: a dry run counts and deletes nothing; applied, it deletes
/// exactly the rows older than their retention (an idempotency key of 40
/// days, a finished saga's row of 100 days, cart activity of 400 days) and
/// leaves the recent ones and a saga that is not final, however old. The
/// pruned saga's order still shows its saga, from the events.
async fn prune_store_deletes_only_what_is_old_enough(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let shop = shop::open(&kernel, 5).await?;
    let token = kernel.customer_token(Uuid::now_v7())?;
    let (old, recent, finished_lately) = (
        customer_order(&kernel, &token, shop.product).await?,
        customer_order(&kernel, &token, shop.product).await?,
        customer_order(&kernel, &token, shop.product).await?,
    );
    for order in [old, recent, finished_lately] {
        confirmed_order_events(&kernel, order).await?;
    }
    // The carts' activity is recorded a moment after the checkout.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for order in [old, recent] {
        while count(
            &db,
            "SELECT COUNT(*) FROM cart_activity WHERE order_id = $1",
            Some(order),
        )
        .await?
            != 1
        {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "no cart activity for {order}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let store = db.event_store();
    for key in ["prune-old", "prune-recent"] {
        store
            .append(
                AppendRequest::single(
                    Uuid::now_v7(),
                    "note",
                    0,
                    vec![NewEvent::new("Noted", json!({}))],
                )
                .with_idempotency_key(key),
            )
            .await?;
    }
    let days_ago =
        |days: i64| (chrono::Utc::now() - chrono::Duration::days(days)).timestamp_micros();
    let aged = [
        (
            format!(
                "UPDATE idempotency_keys SET created_at = {} WHERE key = 'prune-old'",
                match db.kind {
                    support::BackendKind::Postgres => "now() - interval '40 days'".to_string(),
                    support::BackendKind::Sqlite => days_ago(40).to_string(),
                }
            ),
            None,
        ),
        (
            format!(
                "UPDATE saga_instances SET created_at = {}, updated_at = {} WHERE correlation_id = $1",
                days_ago(101),
                days_ago(100)
            ),
            Some(old),
        ),
        // Started long ago, finished yesterday: not old enough.
        (
            format!(
                "UPDATE saga_instances SET created_at = {}, updated_at = {} WHERE correlation_id = $1",
                days_ago(200),
                days_ago(1)
            ),
            Some(finished_lately),
        ),
        // Not final (as a person would find a saga parked a year ago).
        (
            format!(
                "UPDATE saga_instances SET status = 'PARKED', created_at = {}, updated_at = {} \
                 WHERE correlation_id = $1",
                days_ago(401),
                days_ago(400)
            ),
            Some(recent),
        ),
        (
            format!(
                "UPDATE cart_activity SET last_activity_at = {} WHERE order_id = $1",
                days_ago(400)
            ),
            Some(old),
        ),
    ];
    for (statement, order) in &aged {
        ensure!(db.execute(statement, *order).await? == 1, "{statement}");
    }

    let prune = |dry_run: bool| {
        let kernel = &kernel;
        async move {
            let body = kernel.graphql(PRUNE, json!({ "dryRun": dry_run })).await?;
            Ok::<_, anyhow::Error>(body["data"]["pruneStore"].clone())
        }
    };
    let counted =
        json!({ "dryRun": true, "idempotencyKeys": 1, "finishedSagas": 1, "cartActivity": 1 });
    ensure!(prune(true).await? == counted);
    ensure!(prune(true).await? == counted, "a dry run deletes nothing");
    ensure!(
        prune(false).await?
            == json!({ "dryRun": false, "idempotencyKeys": 1, "finishedSagas": 1, "cartActivity": 1 })
    );
    ensure!(
        prune(true).await?
            == json!({ "dryRun": true, "idempotencyKeys": 0, "finishedSagas": 0, "cartActivity": 0 })
    );
    let left = [
        (
            "SELECT COUNT(*) FROM idempotency_keys WHERE key = 'prune-recent'",
            None,
            1,
        ),
        (
            "SELECT COUNT(*) FROM idempotency_keys WHERE key = 'prune-old'",
            None,
            0,
        ),
        (
            "SELECT COUNT(*) FROM saga_instances WHERE correlation_id = $1",
            Some(old),
            0,
        ),
        (
            "SELECT COUNT(*) FROM saga_instances WHERE correlation_id = $1",
            Some(recent),
            1,
        ),
        (
            "SELECT COUNT(*) FROM saga_instances WHERE correlation_id = $1",
            Some(finished_lately),
            1,
        ),
        (
            "SELECT COUNT(*) FROM cart_activity WHERE order_id = $1",
            Some(old),
            0,
        ),
        (
            "SELECT COUNT(*) FROM cart_activity WHERE order_id = $1",
            Some(recent),
            1,
        ),
    ];
    for (query, order, expected) in left {
        ensure!(
            count(&db, query, order).await? == expected,
            "{query} {order:?}"
        );
    }
    let body = kernel
        .graphql(
            "query ($id: UUID!) { order(id: $id) { saga { status } } }",
            json!({ "id": old }),
        )
        .await?;
    ensure!(
        body["data"]["order"]["saga"]["status"] == "COMPLETED",
        "{body}"
    );
    kernel.stop().await
}

/// The periodic inventory check's schedule, as two processes sharing a
/// database see it: within an interval only the first claim wins, the
/// other reports what the run recorded; once the interval has passed the
/// check may run again. The reconciliation mutation records its result too.
async fn a_periodic_check_runs_on_one_process_per_interval(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    use commerce_kernel::storage::maintenance::INVENTORY_CHECK;
    let (first, second) = (db.database.maintenance(), db.database.maintenance());
    let hour = Duration::from_secs(3600);
    ensure!(second.last_check(INVENTORY_CHECK).await?.is_none());
    // An admin's run before any scheduled one is recorded and counts as run.
    second.record_check("elsewhere", 2).await?;
    ensure!(first.last_check("elsewhere").await? == Some(2));
    ensure!(!first.claim_check("elsewhere", hour).await?);
    ensure!(
        first.claim_check(INVENTORY_CHECK, hour).await?,
        "the first claim runs"
    );
    ensure!(
        !second.claim_check(INVENTORY_CHECK, hour).await?,
        "a second claim within the interval waits"
    );
    ensure!(
        second.last_check(INVENTORY_CHECK).await?.is_none(),
        "nothing recorded yet"
    );
    first.record_check(INVENTORY_CHECK, 3).await?;
    ensure!(second.last_check(INVENTORY_CHECK).await? == Some(3));
    tokio::time::sleep(Duration::from_millis(20)).await;
    ensure!(
        second
            .claim_check(INVENTORY_CHECK, Duration::from_millis(10))
            .await?,
        "a run older than the interval is due again"
    );
    ensure!(
        second.last_check(INVENTORY_CHECK).await? == Some(3),
        "a new run keeps the last result until it records its own"
    );

    let kernel = RunningKernel::start(&db, &[]).await?;
    shop::open(&kernel, 5).await?;
    let body = kernel
        .graphql(RECONCILE, json!({ "repair": false }))
        .await?;
    ensure!(
        body["data"]["reconcileInventory"]["drift"] == json!([]),
        "{body}"
    );
    ensure!(
        first.last_check(INVENTORY_CHECK).await? == Some(0),
        "the mutation's result is the latest"
    );
    kernel.stop().await
}

const OVERDUE: &str = "query ($seconds: Int) { sagas(overdueForSeconds: $seconds) {
    totalCount edges { node { id correlationId status currentStep leaseOwner } } } }";

/// The runbook's saga recovery for sagas that are stuck rather than parked.
/// A saga is left as a node that claimed it and died would leave it (its
/// lease held by `node-gone` for an hour, due ten minutes ago) while its
/// payment call is in flight, which that takeover makes the live runner
/// drop. The overdue listing shows exactly that saga and its lease owner,
/// not a finished one; `compensateSagas` requests its compensation, refuses
/// the finished one by id, and counts a repeated id once; once the dead
/// node's lease lapses, the order fails and nothing is overdue any more.
async fn overdue_sagas_are_listed_and_compensated_in_bulk(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let shop = shop::open(&kernel, 5).await?;
    let token = kernel.customer_token(Uuid::now_v7())?;
    let finished = customer_order(&kernel, &token, shop.product).await?;
    confirmed_order_events(&kernel, finished).await?;
    // The fake holds a `tok_slow` answer past the step's deadline: the
    // saga is RUNNING while the takeover below is written.
    let stuck = customer_order_paid_with(&kernel, &token, shop.product, "tok_slow").await?;
    let now = match db.kind {
        support::BackendKind::Postgres => {
            "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::BIGINT"
        }
        support::BackendKind::Sqlite => "CAST(unixepoch('subsec') * 1000000 AS INTEGER)",
    };
    let takeover = format!(
        "UPDATE saga_instances SET lease_owner = 'node-gone', \
         lease_expires_at = {now} + 3600000000, fencing_token = fencing_token + 1, \
         next_run_at = {now} - 600000000 WHERE correlation_id = $1 AND status = 'RUNNING'"
    );
    ensure!(
        db.execute(&takeover, Some(stuck)).await? == 1,
        "the saga ran on"
    );

    let overdue = |seconds: Value| {
        let kernel = &kernel;
        async move {
            let body = kernel
                .graphql(OVERDUE, json!({ "seconds": seconds }))
                .await?;
            Ok::<_, anyhow::Error>(body)
        }
    };
    let body = overdue(json!(300)).await?;
    let listed = &body["data"]["sagas"];
    ensure!(listed["totalCount"] == 1, "{body}");
    let node = &listed["edges"][0]["node"];
    ensure!(
        node["correlationId"] == json!(stuck)
            && node["status"] == "RUNNING"
            && node["leaseOwner"] == "node-gone",
        "{body}"
    );
    let stuck_saga = node["id"].clone();
    // Ten minutes overdue is not an hour overdue.
    let body = overdue(json!(3600)).await?;
    ensure!(body["data"]["sagas"]["totalCount"] == 0, "{body}");
    let body = overdue(json!(-1)).await?;
    ensure!(
        error_code(&body) == Some("INVALID_INPUT")
            && body["errors"][0]["extensions"]["field"] == "overdueForSeconds",
        "{body}"
    );

    let body = kernel
        .graphql(
            "query ($id: UUID!) { order(id: $id) { saga { id } } }",
            json!({ "id": finished }),
        )
        .await?;
    let finished_saga = body["data"]["order"]["saga"]["id"].clone();
    ensure!(finished_saga.is_string(), "{body}");
    let compensate = |reason: &'static str| {
        let (kernel, ids) = (&kernel, json!([stuck_saga, finished_saga, stuck_saga]));
        async move {
            kernel
                .graphql(
                    "mutation ($ids: [UUID!]!, $reason: String!) { compensateSagas(ids: $ids, reason: $reason) {
                        compensated { id } errors { field code } } }",
                    json!({ "ids": ids, "reason": reason }),
                )
                .await
        }
    };
    let body = compensate("  ").await?;
    ensure!(
        body["data"]["compensateSagas"]
            == json!({ "compensated": [], "errors": [{ "field": "reason", "code": "INVALID_INPUT" }] }),
        "{body}"
    );
    let body = compensate("stuck since the outage").await?;
    let payload = &body["data"]["compensateSagas"];
    ensure!(
        payload["compensated"] == json!([{ "id": stuck_saga }]),
        "{body}"
    );
    let errors = payload["errors"].as_array().context("errors")?;
    ensure!(
        errors.len() == 1 && errors[0]["field"] == finished_saga,
        "{body}"
    );

    // The dead node's lease lapses: a live runner takes the saga over.
    let lapse =
        format!("UPDATE saga_instances SET lease_expires_at = {now} - 1 WHERE correlation_id = $1");
    ensure!(db.execute(&lapse, Some(stuck)).await? == 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let body = kernel
            .graphql(
                "query ($id: UUID!) { order(id: $id) { status saga { status } } }",
                json!({ "id": stuck }),
            )
            .await?;
        let order = &body["data"]["order"];
        if order["status"] == "FAILED" && order["saga"]["status"] == "COMPENSATED" {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = overdue(json!(0)).await?;
    ensure!(body["data"]["sagas"]["totalCount"] == 0, "{body}");
    kernel.stop().await
}

/// The count `query` (its `$1` bound to `id`, if given) reads.
async fn count(db: &TestDatabase, query: &str, id: Option<Uuid>) -> anyhow::Result<i64> {
    Ok(match db.kind {
        support::BackendKind::Postgres => {
            let pool = sqlx::PgPool::connect(&db.url()).await?;
            let mut statement = sqlx::query_as::<_, (i64,)>(query);
            if let Some(id) = id {
                statement = statement.bind(id);
            }
            let (rows,) = statement.fetch_one(&pool).await?;
            pool.close().await;
            rows
        }
        support::BackendKind::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&db.url()).await?;
            let mut statement = sqlx::query_as::<_, (i64,)>(query);
            if let Some(id) = id {
                statement = statement.bind(id);
            }
            let (rows,) = statement.fetch_one(&pool).await?;
            pool.close().await;
            rows
        }
    })
}

/// The shipping address the suite's orders written directly go to.
fn berlin() -> Address {
    Address {
        name: "Ada".into(),
        line1: "1 Main St".into(),
        line2: None,
        city: "Berlin".into(),
        postal_code: "10115".into(),
        region: None,
        country: "DE".into(),
    }
}
