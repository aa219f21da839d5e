//! A storefront in a browser, without an identity provider: guests start
//! sessions, buy and watch their orders live; CORS answers the configured
//! origins only; guest sessions are rate-limited per client address.
//! Runs on every backend (see support/mod.rs).

#[macro_use]
mod support;

use std::sync::Arc;

use anyhow::{Context as _, ensure};
use commerce_kernel::config;
use serde_json::{Value, json};
use support::TestDatabase;
use support::kernel::{RunningKernel, TEST_JWT_SECRET, error_code, payload_codes};
use support::shop::{self, AdminClient as _, address};
use support::socket::{Frame, Protocol, Socket};
use uuid::Uuid;

fn main() {
    support::run_suite(&cases![
        a_guest_buys_without_an_identity_provider_and_watches_the_order_live,
        guest_sessions_are_limited_per_client_address,
        cors_answers_the_configured_origins_only,
        guest_tokens_cannot_be_forged_into_more,
        the_public_catalog_lists_products_on_sale_only,
    ]);
}

const START_SESSION: &str = "mutation { createGuestSession { session { token customerId expiresAt } errors { code message } } }";

/// `createGuestSession` without a token, from `forwarded_for` when given.
async fn start_session(
    kernel: &RunningKernel,
    forwarded_for: Option<&str>,
) -> anyhow::Result<Value> {
    let request = kernel
        .http
        .post(kernel.url("/graphql"))
        .json(&json!({ "query": START_SESSION }));
    let request = match forwarded_for {
        Some(address) => request.header("x-forwarded-for", address),
        None => request,
    };
    let response = request.send().await?;
    ensure!(response.status() == 200, "{}", response.status());
    let body: Value = response.json().await?;
    Ok(body["data"]["createGuestSession"].clone())
}

/// The guest's session token and customer id.
fn session(payload: &Value) -> anyhow::Result<(String, Uuid)> {
    let session = &payload["session"];
    Ok((
        session["token"]
            .as_str()
            .with_context(|| payload.to_string())?
            .to_string(),
        serde_json::from_value(session["customerId"].clone())?,
    ))
}

/// A guest with no identity provider anywhere: session, cart, checkout,
/// the order followed to CONFIRMED over the subscription; another guest
/// sees neither the cart nor the order; the events name the guest.
async fn a_guest_buys_without_an_identity_provider_and_watches_the_order_live(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[(config::DEFAULT_PLUGINS, "true")]).await?;
    let product = shop::stocked_product(&kernel, 2).await?;

    let first = start_session(&kernel, None).await?;
    ensure!(first["errors"] == json!([]), "{first}");
    let (token, guest) = session(&first)?;
    let as_guest = |query: &'static str, variables: Value| {
        let token = token.clone();
        let kernel = &kernel;
        async move {
            let (status, body) = kernel.graphql_as(Some(&token), query, variables).await?;
            ensure!(status == 200, "{status} {body}");
            anyhow::Ok(body)
        }
    };
    let made = as_guest(
        "mutation ($input: CreateCartInput!) { createCart(input: $input) { cart { id customerId } errors { code message } } }",
        json!({ "input": { "items": [{ "productId": product, "quantity": 1 }] } }),
    )
    .await?;
    let cart = &made["data"]["createCart"]["cart"];
    ensure!(
        cart["customerId"] == json!(guest),
        "the cart is the guest's: {made}"
    );
    const PLACE: &str = "mutation ($cart: UUID!, $address: AddressInput!, $email: String) { placeOrder(input: { cartId: $cart, paymentMethod: \"invoice\", shippingAddress: $address, email: $email }) { order { id customerId email } cart { status } errors { code field message } } }";
    // An address that is no email is refused, and the cart stays open.
    let refused = as_guest(
        PLACE,
        json!({ "cart": cart["id"], "address": address("DE"), "email": "ada at example.com" }),
    )
    .await?;
    ensure!(
        refused["data"]["placeOrder"]["order"].is_null()
            && payload_codes(&refused["data"]["placeOrder"]) == ["INVALID_INPUT"]
            && refused["data"]["placeOrder"]["errors"][0]["field"] == "email",
        "{refused}"
    );
    let still = as_guest(
        "query ($cart: UUID!) { cart(id: $cart) { status } }",
        json!({ "cart": cart["id"] }),
    )
    .await?;
    ensure!(
        still["data"]["cart"]["status"] == "OPEN",
        "a refused checkout leaves the cart open: {still}"
    );
    // A unique address, so the admin's search below finds this order alone.
    let email = format!("Ada.{}@Example.COM", Uuid::now_v7().simple());
    let placed = as_guest(
        PLACE,
        json!({ "cart": cart["id"], "address": address("DE"), "email": email }),
    )
    .await?;
    let order = placed["data"]["placeOrder"]["order"].clone();
    ensure!(order["customerId"] == json!(guest), "{placed}");
    ensure!(
        order["email"] == json!(email.replace("Example.COM", "example.com")),
        "the email is kept, its domain lowercased: {placed}"
    );

    // Watched live, with the guest token in connection_init.
    let mut socket = Socket::connect(
        &kernel,
        Protocol::TransportWs,
        json!({ "authorization": format!("Bearer {token}") }),
    )
    .await?
    .map_err(|reason| anyhow::anyhow!("the guest's socket was refused: {reason}"))?;
    socket
        .subscribe(
            "1",
            "subscription ($id: UUID!) { orderStatusChanged(orderId: $id) { status } }",
            json!({ "id": order["id"] }),
        )
        .await?;
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("CONFIRMED") {
        match socket.next_frame().await? {
            Frame::Next(payload) => seen.push(
                payload["data"]["orderStatusChanged"]["status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ),
            other => {
                anyhow::bail!("the subscription ended before CONFIRMED: {other:?} after {seen:?}")
            }
        }
    }
    ensure!(
        seen.first().map(String::as_str) == Some("PENDING"),
        "{seen:?}"
    );

    // Another guest: the first guest's cart and order read as missing.
    let (other, _) = session(&start_session(&kernel, None).await?)?;
    let (_, theirs) = kernel
        .graphql_as(
            Some(&other),
            "query ($order: UUID!, $cart: UUID!) { order(id: $order) { id } cart(id: $cart) { id } orders { totalCount } }",
            json!({ "order": order["id"], "cart": cart["id"] }),
        )
        .await?;
    ensure!(
        theirs["data"]["order"].is_null()
            && theirs["data"]["cart"].is_null()
            && theirs["data"]["orders"]["totalCount"] == 0,
        "{theirs}"
    );
    // An admin finds the guest's order by the email, in any letter case;
    // the other guest's search by it finds only their own orders (none).
    let by_email =
        "query ($email: String!) { orders(email: $email) { totalCount edges { node { id } } } }";
    let found = kernel
        .graphql(by_email, json!({ "email": email.to_uppercase() }))
        .await?;
    ensure!(
        found["data"]["orders"]["totalCount"] == 1
            && found["data"]["orders"]["edges"].as_array().map(Vec::len) == Some(1)
            && found["data"]["orders"]["edges"][0]["node"]["id"] == order["id"],
        "{found}"
    );
    let (_, searched) = kernel
        .graphql_as(Some(&other), by_email, json!({ "email": email }))
        .await?;
    ensure!(searched["data"]["orders"]["totalCount"] == 0, "{searched}");
    // A guest is a customer, never an admin.
    let (status, body) = kernel
        .graphql_as(Some(&token), "{ eventLogHead }", json!({}))
        .await?;
    ensure!(error_code(&body) == Some("FORBIDDEN"), "{status} {body}");

    let events = kernel
        .graphql(
            "query ($id: UUID!) { aggregateEvents(aggregateId: $id) { edges { node { actor } } } }",
            json!({ "id": order["id"] }),
        )
        .await?;
    ensure!(
        events["data"]["aggregateEvents"]["edges"][0]["node"]["actor"]
            == json!(format!("guest:{guest}")),
        "{events}"
    );
    kernel.stop().await
}

/// Two sessions a minute per address here: the third is refused with
/// RATE_LIMITED, while another address (through a trusted proxy) still
/// gets its own. An untrusted `X-Forwarded-For` changes nothing.
async fn guest_sessions_are_limited_per_client_address(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let behind_proxy = RunningKernel::start(
        &db,
        &[
            (config::GUEST_SESSIONS_PER_MINUTE, "2"),
            (config::TRUST_FORWARDED_FOR, "true"),
        ],
    )
    .await?;
    for _ in 0..2 {
        let started = start_session(&behind_proxy, Some("198.51.100.7")).await?;
        ensure!(started["errors"] == json!([]), "{started}");
    }
    let refused = start_session(&behind_proxy, Some("198.51.100.7")).await?;
    ensure!(
        refused["session"].is_null() && payload_codes(&refused) == ["RATE_LIMITED"],
        "{refused}"
    );
    // The proxy appends the address it saw: the last entry is the client.
    let another = start_session(&behind_proxy, Some("203.0.113.9, 198.51.100.8")).await?;
    ensure!(another["errors"] == json!([]), "{another}");
    let spoofed = start_session(&behind_proxy, Some("198.51.100.8, 198.51.100.7")).await?;
    ensure!(payload_codes(&spoofed) == ["RATE_LIMITED"], "{spoofed}");
    // A proxy that appends `ip:port` names the same client.
    let with_port = start_session(&behind_proxy, Some("198.51.100.7:51234")).await?;
    ensure!(payload_codes(&with_port) == ["RATE_LIMITED"], "{with_port}");
    // A last entry that is no address: the connection's peer counts, never
    // an earlier entry the client wrote.
    let mut codes = Vec::new();
    for n in 0..3 {
        let started = start_session(&behind_proxy, Some(&format!("192.0.2.{n}, unknown"))).await?;
        codes.push(payload_codes(&started));
    }
    ensure!(
        codes == [vec![], vec![], vec!["RATE_LIMITED".to_string()]],
        "{codes:?}"
    );

    // Not behind a trusted proxy: the header is the client's own word, and
    // every request here comes from 127.0.0.1.
    let direct = RunningKernel::join(
        &behind_proxy,
        &db,
        &[(config::GUEST_SESSIONS_PER_MINUTE, "2")],
    )
    .await?;
    let mut codes = Vec::new();
    for n in 0..3 {
        let started = start_session(&direct, Some(&format!("192.0.2.{n}"))).await?;
        codes.push(payload_codes(&started));
    }
    ensure!(
        codes == [vec![], vec![], vec!["RATE_LIMITED".to_string()]],
        "{codes:?}"
    );
    direct.stop().await?;
    behind_proxy.stop().await
}

/// Preflights and requests from a configured origin get CORS headers; from
/// any other origin none. A subscription socket opened by a page of another
/// origin is refused; the configured origin's and the kernel's own
/// (GraphiQL) are accepted.
async fn cors_answers_the_configured_origins_only(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let shop_origin = "http://shop.test:3000";
    let kernel = RunningKernel::start(
        &db,
        &[(
            config::CORS_ORIGINS,
            "http://shop.test:3000, https://www.shop.test",
        )],
    )
    .await?;
    let preflight = |origin: &str| {
        kernel
            .http
            .request(reqwest::Method::OPTIONS, kernel.url("/graphql"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let allowed = preflight(shop_origin).await?;
    let header = |response: &reqwest::Response, name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
    };
    ensure!(
        allowed.status().is_success()
            && header(&allowed, "access-control-allow-origin").as_deref() == Some(shop_origin)
            && header(&allowed, "access-control-allow-headers")
                .is_some_and(|h| h.contains("authorization") && h.contains("content-type"))
            && header(&allowed, "access-control-allow-methods").is_some_and(|m| m.contains("post")),
        "preflight from the shop: {:?}",
        allowed.headers()
    );
    let foreign = preflight("https://evil.test").await?;
    ensure!(
        header(&foreign, "access-control-allow-origin").is_none(),
        "preflight from elsewhere: {:?}",
        foreign.headers()
    );
    let post = |origin: &'static str| {
        kernel
            .http
            .post(kernel.url("/graphql"))
            .header("origin", origin)
            .json(&json!({ "query": "{ products { totalCount } }" }))
            .send()
    };
    let from_shop = post("https://www.shop.test").await?;
    ensure!(
        from_shop.status() == 200
            && header(&from_shop, "access-control-allow-origin").as_deref()
                == Some("https://www.shop.test"),
        "{:?}",
        from_shop.headers()
    );
    let from_elsewhere = post("https://evil.test").await?;
    ensure!(
        header(&from_elsewhere, "access-control-allow-origin").is_none(),
        "{:?}",
        from_elsewhere.headers()
    );

    let token = kernel.customer_token(Uuid::now_v7())?;
    let init = json!({ "authorization": format!("Bearer {token}") });
    for (origin, welcome) in [
        (Some(shop_origin.to_string()), true),
        (Some(format!("http://{}", kernel.address)), true),
        (None, true),
        (Some("https://evil.test".to_string()), false),
    ] {
        let opened = Socket::connect_from(
            &kernel,
            Protocol::TransportWs,
            init.clone(),
            origin.as_deref(),
        )
        .await;
        ensure!(
            matches!(opened, Ok(Ok(_))) == welcome,
            "socket from {origin:?}: {:?}",
            opened.map(|o| o.map(|_| "open"))
        );
    }
    kernel.stop().await
}

/// A guest token is a customer token for one random id: it cannot name
/// another customer or claim admin, and where an identity provider signs
/// the tokens, the guest secret signs guest tokens and nothing else.
async fn guest_tokens_cannot_be_forged_into_more(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let sign = |secret: &str, claims: Value| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
    };
    let exp = chrono::Utc::now().timestamp() + 60;
    let kernel = RunningKernel::start(&db, &[]).await?;
    let admin_guest = sign(
        TEST_JWT_SECRET,
        json!({ "sub": Uuid::now_v7(), "roles": ["admin"], "guest": true, "iss": "commerce-kernel", "aud": "commerce-kernel", "exp": exp }),
    )?;
    let (status, _) = kernel
        .graphql_as(Some(&admin_guest), "{ eventLogHead }", json!({}))
        .await?;
    ensure!(status == 401, "a guest token claiming admin: {status}");

    // Tokens from an identity provider; guest sessions signed with their own secret.
    let guest_secret = "guest-secret-guest-secret-guest-secret";
    let idp = RunningKernel::join(
        &kernel,
        &db,
        &[
            (config::JWKS_URL, "http://127.0.0.1:9/jwks.json"),
            (config::JWT_SECRET, ""),
            (config::GUEST_TOKEN_SECRET, guest_secret),
        ],
    )
    .await?;
    let (token, guest) = session(&start_session(&idp, None).await?)?;
    let (status, body) = idp
        .graphql_as(Some(&token), "{ orders { totalCount } }", json!({}))
        .await?;
    ensure!(
        status == 200 && body["data"]["orders"]["totalCount"] == 0,
        "the guest of {guest}: {status} {body}"
    );
    for (what, claims) in [
        (
            "a customer token signed with the guest secret",
            json!({ "sub": Uuid::now_v7(), "roles": ["customer"], "iss": "commerce-kernel", "aud": "commerce-kernel", "exp": exp }),
        ),
        (
            "an admin token signed with the guest secret",
            json!({ "sub": "ops", "roles": ["admin"], "guest": true, "iss": "commerce-kernel", "aud": "commerce-kernel", "exp": exp }),
        ),
    ] {
        let forged = sign(guest_secret, claims)?;
        let (status, body) = idp
            .graphql_as(Some(&forged), "{ orders { totalCount } }", json!({}))
            .await?;
        ensure!(status == 401, "{what}: {status} {body}");
    }

    // An identity provider and no guest secret: no guest sessions, said so.
    let no_guests = RunningKernel::join(
        &kernel,
        &db,
        &[
            (config::JWKS_URL, "http://127.0.0.1:9/jwks.json"),
            (config::JWT_SECRET, ""),
        ],
    )
    .await?;
    let response = no_guests
        .http
        .post(no_guests.url("/graphql"))
        .json(&json!({ "query": START_SESSION }))
        .send()
        .await?;
    let body: Value = response.json().await?;
    ensure!(error_code(&body) == Some("FORBIDDEN"), "{body}");
    no_guests.stop().await?;
    idp.stop().await?;
    kernel.stop().await
}

/// A product taken off sale leaves the listing for everyone but admins
/// (and its count), while `product(id)` still answers with `active: false`.
async fn the_public_catalog_lists_products_on_sale_only(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let on_sale = shop::stocked_product(&kernel, 1).await?;
    let off_sale = shop::stocked_product(&kernel, 1).await?;
    kernel
        .mutate(
            "updateProduct",
            "mutation ($id: UUID!) { updateProduct(input: { id: $id, active: false }) { product { active } errors { code message } } }",
            json!({ "id": off_sale }),
        )
        .await?;
    // Other tests share the database and may add products meanwhile: list
    // from just before the two, a page long enough to hold both.
    let before_both = Uuid::from_u128(on_sale.as_u128() - 1).to_string();
    let listing = "query ($after: String) { products(first: 50, after: $after) { totalCount edges { node { id active } } } }";
    let listed = |body: &Value| -> Vec<Value> {
        body["data"]["products"]["edges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|edge| edge["node"]["id"].clone())
            .collect()
    };
    let counted = |body: &Value| body["data"]["products"]["totalCount"].as_u64().unwrap_or(0);
    let mut public_counts = Vec::new();
    for token in [None, Some(kernel.customer_token(Uuid::now_v7())?)] {
        let (status, body) = kernel
            .graphql_as(token.as_deref(), listing, json!({ "after": before_both }))
            .await?;
        ensure!(status == 200, "{status} {body}");
        ensure!(listed(&body).first() == Some(&json!(on_sale)), "{body}");
        ensure!(!listed(&body).contains(&json!(off_sale)), "{body}");
        public_counts.push(counted(&body));
    }
    let admin = kernel
        .graphql(listing, json!({ "after": before_both }))
        .await?;
    ensure!(
        listed(&admin).first() == Some(&json!(on_sale))
            && listed(&admin).contains(&json!(off_sale)),
        "the admin sees both: {admin}"
    );
    // Products are only ever added, so a later count is at least an
    // earlier one; the admin's, asked last, also counts the inactive one.
    ensure!(
        public_counts.iter().all(|public| counted(&admin) > *public),
        "the public count leaves inactive products out: {admin} {public_counts:?}"
    );
    let (_, single) = kernel
        .graphql_as(
            None,
            "query ($id: UUID!) { product(id: $id) { active } }",
            json!({ "id": off_sale }),
        )
        .await?;
    ensure!(single["data"]["product"]["active"] == false, "{single}");
    kernel.stop().await
}
