//! The HTTP surface: health, readiness, GraphQL over the event log, limits and
//! graceful shutdown. Runs on every backend (see support/mod.rs).

#[macro_use]
mod support;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use commerce_kernel::config;
use commerce_kernel::event_store::{AppendOutcome, AppendRequest, NewEvent};
use serde_json::{Value, json};
use support::kernel::{RunningKernel, error_code, payload_codes};
use support::{TestDatabase, run_suite, wait_until_readable};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use uuid::Uuid;

fn main() {
    run_suite(&cases![
        health_and_ready_report_the_database,
        graphql_pages_through_the_event_log,
        graphql_reads_a_stream_as_of_a_version,
        graphql_errors_carry_codes,
        graphiql_is_served_on_get,
        in_flight_requests_finish_on_shutdown,
        graphql_catalog_and_inventory_read_their_own_writes,
        graphql_orders_show_their_history_and_past_versions,
        graphql_carts_check_out_once_and_report_abandonment,
        graphql_plugins_install_activate_roll_back_on_every_node,
    ]);
}

/// Appends `count` events to a new stream and waits until log readers see them.
async fn append_events(
    db: &TestDatabase,
    aggregate_id: Uuid,
    count: usize,
) -> anyhow::Result<AppendOutcome> {
    let events = (0..count)
        .map(|i| NewEvent::new("Deposited", json!({ "n": i })))
        .collect();
    let store = db.event_store();
    let outcome = store
        .append(AppendRequest::single(aggregate_id, "account", 0, events))
        .await?;
    wait_until_readable(store.as_ref(), outcome.last_position).await?;
    Ok(outcome)
}

async fn health_and_ready_report_the_database(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let health = kernel.http.get(kernel.url("/health")).send().await?;
    ensure!(health.status() == 200);
    let body: Value = health.json().await?;
    ensure!(body["status"] == "ok", "{body}");
    ensure!(body["checks"]["database"]["status"] == "up");
    ensure!(body["checks"]["database"]["backend"] == db.kind.name());
    ensure!(body["checks"]["database"]["latency_ms"].is_number());
    let carts = &body["checks"]["carts"];
    ensure!(carts["status"] == "up", "{body}");
    ensure!(carts["backend"] == kernel.carts.kind.name(), "{body}");

    let ready = kernel.http.get(kernel.url("/ready")).send().await?;
    ensure!(ready.status() == 200);
    ensure!(ready.json::<Value>().await?["status"] == "ready");

    // With the database gone, both say so with 503 instead of hanging or lying.
    db.database.close().await;
    let health = kernel.http.get(kernel.url("/health")).send().await?;
    ensure!(
        health.status() == 503,
        "health with a closed database: {}",
        health.status()
    );
    let body: Value = health.json().await?;
    ensure!(body["checks"]["database"]["status"] == "down", "{body}");
    ensure!(kernel.http.get(kernel.url("/ready")).send().await?.status() == 503);
    kernel.stop().await
}

const EVENTS_PAGE: &str = "query($first: Int, $after: String, $id: UUID) {
  events(first: $first, after: $after, aggregateId: $id) {
    edges { cursor node { id position aggregateId aggregateType eventType version schemaVersion data createdAt } }
    pageInfo { hasNextPage hasPreviousPage endCursor }
  }
}";

async fn graphql_pages_through_the_event_log(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let account = Uuid::now_v7();
    append_events(&db, account, 5).await?;
    append_events(&db, Uuid::now_v7(), 2).await?;
    let kernel = RunningKernel::start(&db, &[]).await?;

    let mut cursor = Value::Null;
    let mut versions = Vec::new();
    loop {
        let page = kernel
            .graphql(
                EVENTS_PAGE,
                json!({ "first": 2, "after": cursor, "id": account }),
            )
            .await?;
        ensure!(page.get("errors").is_none(), "{page}");
        let events = &page["data"]["events"];
        for edge in events["edges"].as_array().context("edges")? {
            ensure!(edge["cursor"] == edge["node"]["position"]);
            ensure!(edge["node"]["aggregateId"] == account.to_string());
            ensure!(
                edge["node"]["eventType"] == "Deposited"
                    && edge["node"]["aggregateType"] == "account"
            );
            versions.push(edge["node"]["version"].as_i64().context("version")?);
        }
        if events["pageInfo"]["hasNextPage"] != true {
            break;
        }
        cursor = events["pageInfo"]["endCursor"].clone();
    }
    ensure!(versions == [1, 2, 3, 4, 5], "{versions:?}");

    let all = kernel.graphql(EVENTS_PAGE, json!({ "first": 500 })).await?;
    ensure!(all["data"]["events"]["edges"].as_array().map(Vec::len) == Some(7));
    ensure!(all["data"]["events"]["pageInfo"]["hasNextPage"] == false);
    let head = kernel.graphql("{ eventLogHead }", json!({})).await?;
    let last_cursor = all["data"]["events"]["edges"][6]["cursor"].clone();
    ensure!(head["data"]["eventLogHead"] == last_cursor, "{head}");
    kernel.stop().await
}

async fn graphql_reads_a_stream_as_of_a_version(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let account = Uuid::now_v7();
    append_events(&db, account, 4).await?;
    let kernel = RunningKernel::start(&db, &[]).await?;
    let query = "query($id: UUID!, $v: Int, $first: Int, $after: String) {
      aggregateEvents(aggregateId: $id, untilVersion: $v, first: $first, after: $after) {
        totalCount edges { cursor node { version data } } pageInfo { hasNextPage endCursor }
      }
    }";
    let at_two = kernel
        .graphql(query, json!({ "id": account, "v": 2 }))
        .await?;
    let page = &at_two["data"]["aggregateEvents"];
    let events = page["edges"].as_array().context("events")?;
    ensure!(
        events.len() == 2 && events[1]["node"]["data"] == json!({ "n": 1 }),
        "{at_two}"
    );
    ensure!(
        page["totalCount"] == 2 && page["pageInfo"]["hasNextPage"] == false,
        "{at_two}"
    );
    // Paged by version: 4 events as 3 + 1, nothing skipped or repeated.
    let first = kernel
        .graphql(query, json!({ "id": account, "first": 3 }))
        .await?;
    let first = &first["data"]["aggregateEvents"];
    ensure!(
        first["totalCount"] == 4 && first["pageInfo"]["hasNextPage"] == true,
        "{first}"
    );
    let rest = kernel
        .graphql(
            query,
            json!({ "id": account, "first": 3, "after": first["pageInfo"]["endCursor"] }),
        )
        .await?;
    let rest = &rest["data"]["aggregateEvents"];
    let versions: Vec<&Value> = first["edges"]
        .as_array()
        .into_iter()
        .chain(rest["edges"].as_array())
        .flatten()
        .map(|edge| &edge["node"]["version"])
        .collect();
    ensure!(versions == [1, 2, 3, 4], "{versions:?}");
    ensure!(rest["pageInfo"]["hasNextPage"] == false, "{rest}");
    kernel.stop().await
}

async fn graphql_errors_carry_codes(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let bad_cursor = kernel
        .graphql(EVENTS_PAGE, json!({ "after": "not-a-cursor" }))
        .await?;
    ensure!(
        error_code(&bad_cursor) == Some("INVALID_INPUT"),
        "{bad_cursor}"
    );
    ensure!(bad_cursor["errors"][0]["extensions"]["field"] == "after");
    for first in [0, -1, 501] {
        let response = kernel
            .graphql(EVENTS_PAGE, json!({ "first": first }))
            .await?;
        ensure!(
            error_code(&response) == Some("INVALID_INPUT"),
            "first={first}: {response}"
        );
    }
    let negative = kernel
        .graphql("{ aggregateEvents(aggregateId: \"00000000-0000-0000-0000-000000000000\", untilVersion: -1) { totalCount } }", json!({}))
        .await?;
    ensure!(error_code(&negative) == Some("INVALID_INPUT"), "{negative}");
    // Malformed documents are GraphQL errors, not server errors.
    for document in [
        "{",
        "{ nope }",
        "query { events(first: \"x\") { pageInfo { hasNextPage } } }",
    ] {
        let response = kernel.graphql(document, json!({})).await?;
        ensure!(response["errors"].is_array(), "{document}: {response}");
    }
    kernel.stop().await
}

async fn graphiql_is_served_on_get(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let page = kernel.http.get(kernel.url("/graphql")).send().await?;
    ensure!(page.status() == 200);
    ensure!(page.text().await?.to_lowercase().contains("graphiql"));

    // Started before the first stops: stopping a kernel closes the database pool.
    let locked = RunningKernel::start(&db, &[(config::GRAPHIQL, "false")]).await?;
    ensure!(
        locked
            .http
            .get(locked.url("/graphql"))
            .send()
            .await?
            .status()
            == 405
    );
    locked.stop().await?;
    kernel.stop().await
}

async fn in_flight_requests_finish_on_shutdown(db: Arc<TestDatabase>) -> anyhow::Result<()> {
    append_events(&db, Uuid::now_v7(), 3).await?;
    let kernel = RunningKernel::start(&db, &[]).await?;
    let body = json!({ "query": "{ events { edges { node { id } } } }" }).to_string();
    let (head, tail) = body.split_at(body.len() / 2);

    // A request whose body is still arriving when shutdown begins.
    let mut stream = tokio::net::TcpStream::connect(kernel.address).await?;
    let request = format!(
        "POST /graphql HTTP/1.1\r\nHost: kernel\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{head}",
        kernel.admin,
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let RunningKernel {
        address,
        carts,
        shutdown,
        task,
        ..
    } = kernel;
    let _ = shutdown.send(());
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(
        !task.is_finished(),
        "the kernel stopped with a request in flight"
    );
    ensure!(
        tokio::net::TcpStream::connect(address).await.is_err(),
        "a draining kernel still accepts new connections"
    );

    stream.write_all(tail.as_bytes()).await?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .context("no response to the in-flight request")??;
    ensure!(
        response.starts_with("HTTP/1.1 200"),
        "in-flight request answered: {response}"
    );
    ensure!(response.matches("\"id\"").count() == 3, "{response}");
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .context("kernel did not stop after its last request")???;
    carts.remove().await
}

const CREATE_PRODUCT: &str = r#"
mutation ($sku: String!, $amount: Decimal!) {
  createProduct(input: { sku: $sku, name: "Teapot", price: { amount: $amount, currency: "EUR" } }) {
    product { id sku price { amount currency } version }
    errors { field code message }
  }
}"#;

async fn graphql_catalog_and_inventory_read_their_own_writes(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let created = kernel
        .graphql(CREATE_PRODUCT, json!({ "sku": "TEA-1", "amount": "24.90" }))
        .await?;
    let payload = &created["data"]["createProduct"];
    ensure!(payload_codes(payload).is_empty(), "{created}");
    ensure!(
        payload["product"]["price"] == json!({ "amount": "24.90", "currency": "EUR" }),
        "{created}"
    );
    let id = payload["product"]["id"]
        .as_str()
        .context("product id")?
        .to_string();

    // Same SKU in another case: a typed payload error, not a GraphQL error.
    let duplicate = kernel
        .graphql(CREATE_PRODUCT, json!({ "sku": "tea-1", "amount": "1" }))
        .await?;
    ensure!(
        payload_codes(&duplicate["data"]["createProduct"]) == ["DUPLICATE_SKU"],
        "{duplicate}"
    );
    let bad_price = kernel
        .graphql(CREATE_PRODUCT, json!({ "sku": "TEA-2", "amount": "1.999" }))
        .await?;
    ensure!(
        payload_codes(&bad_price["data"]["createProduct"]) == ["INVALID_INPUT"],
        "{bad_price}"
    );

    let adjusted = kernel
        .graphql(
            r#"mutation ($id: UUID!) {
                 adjustInventory(input: { productId: $id, delta: 2, reason: "delivery" }) {
                   inventory { onHand reserved available version } errors { code }
                 }
               }"#,
            json!({ "id": id }),
        )
        .await?;
    // Read-your-writes: the payload (read from the projection) shows the change.
    ensure!(
        adjusted["data"]["adjustInventory"]["inventory"]
            == json!({ "onHand": 2, "reserved": 0, "available": 2, "version": 1 }),
        "{adjusted}"
    );

    const RESERVE: &str = r#"mutation ($id: UUID!, $owner: String!, $expected: Int) {
        reserveInventory(productId: $id, quantity: 2, owner: $owner, expectedVersion: $expected, ttlSeconds: 600) {
          reservation { id quantity owner } inventory { available } errors { field code }
        }
      }"#;
    let stale = kernel
        .graphql(
            RESERVE,
            json!({ "id": id, "owner": "cart:1", "expected": 0 }),
        )
        .await?;
    ensure!(
        payload_codes(&stale["data"]["reserveInventory"]) == ["VERSION_CONFLICT"],
        "{stale}"
    );
    let reserved = kernel
        .graphql(
            RESERVE,
            json!({ "id": id, "owner": "cart:1", "expected": 1 }),
        )
        .await?;
    let payload = &reserved["data"]["reserveInventory"];
    ensure!(
        payload["inventory"]["available"] == 0 && payload["reservation"]["quantity"] == 2,
        "{reserved}"
    );
    let reservation = payload["reservation"]["id"]
        .as_str()
        .context("reservation")?
        .to_string();
    let sold_out = kernel
        .graphql(
            RESERVE,
            json!({ "id": id, "owner": "cart:2", "expected": null }),
        )
        .await?;
    ensure!(
        payload_codes(&sold_out["data"]["reserveInventory"]) == ["INSUFFICIENT_STOCK"],
        "{sold_out}"
    );

    let released = kernel
        .graphql(
            r#"mutation ($r: UUID!) { releaseInventory(reservationId: $r) { inventory { available } errors { code } } }"#,
            json!({ "r": reservation }),
        )
        .await?;
    ensure!(
        released["data"]["releaseInventory"]["inventory"]["available"] == 2,
        "{released}"
    );

    let listed = kernel
        .graphql(
            r#"{ products(first: 10) { edges { node { sku inventory { onHand } } } pageInfo { hasNextPage } }
                 projections { name pendingEvents } }"#,
            json!({}),
        )
        .await?;
    ensure!(
        listed["data"]["products"]["edges"]
            == json!([{ "node": { "sku": "TEA-1", "inventory": { "onHand": 2 } } }]),
        "{listed}"
    );

    let rebuilt = kernel
        .graphql(
            r#"mutation { rebuildProjections { projections { name pendingEvents } errors { code } } }"#,
            json!({}),
        )
        .await?;
    ensure!(
        payload_codes(&rebuilt["data"]["rebuildProjections"]).is_empty(),
        "{rebuilt}"
    );
    let again = kernel
        .graphql(
            r#"{ products(first: 10) { edges { node { sku inventory { onHand available } } } } }"#,
            json!({}),
        )
        .await?;
    ensure!(
        again["data"]["products"]["edges"]
            == json!([{ "node": { "sku": "TEA-1", "inventory": { "onHand": 2, "available": 2 } } }]),
        "{again}"
    );
    kernel.stop().await
}

async fn graphql_orders_show_their_history_and_past_versions(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    use commerce_kernel::commerce::{
        CommandContext, Commerce, NewProduct, OrderTransition, PlaceOrderInput,
    };
    use commerce_kernel::domain::money::{Currency, Money};
    use commerce_kernel::domain::order::Address;

    let kernel = RunningKernel::start(&db, &[]).await?;
    // Orders are placed by checkout (issue 4); here, by the command handlers directly.
    let commerce = Commerce::new(db.event_store(), db.database.view_store());
    let context = CommandContext::default();
    let product = commerce
        .create_product(
            NewProduct {
                sku: "CUP-1".into(),
                name: "Cup".into(),
                price: Money::new("3.30".parse()?, Currency::parse("EUR")?)?,
                active: true,
            },
            &context,
        )
        .await?;
    commerce
        .adjust_inventory(product.id, 5, "delivery", None, &context)
        .await?;
    let order = commerce
        .place_order(
            PlaceOrderInput {
                customer_id: Uuid::now_v7(),
                lines: vec![(product.id, 3)],
                shipping_address: Address {
                    name: "Ada".into(),
                    line1: "1 Main St".into(),
                    line2: None,
                    city: "Springfield".into(),
                    postal_code: "12345".into(),
                    region: None,
                    country: "US".into(),
                },
                payment_method: "card".into(),
                idempotency_key: None,
                email: None,
            },
            &context,
        )
        .await?;
    let reserved = commerce
        .transition_order(order.id, OrderTransition::ReserveInventory, None, &context)
        .await?;
    wait_until_readable(
        db.event_store().as_ref(),
        reserved.position.context("position")?,
    )
    .await?;

    const ORDER: &str = r#"query ($id: UUID!, $v: Int) {
        order(id: $id, asOfVersion: $v) { status total { amount } version lines { quantity lineTotal { amount } } events { eventType version } }
      }"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let now = loop {
        let now = kernel
            .graphql(ORDER, json!({ "id": order.id, "v": null }))
            .await?;
        if now["data"]["order"]["status"] == "INVENTORY_RESERVED"
            || tokio::time::Instant::now() > deadline
        {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let view = &now["data"]["order"];
    ensure!(
        view["status"] == "INVENTORY_RESERVED" && view["total"]["amount"] == "9.90",
        "{now}"
    );
    ensure!(
        view["lines"] == json!([{ "quantity": 3, "lineTotal": { "amount": "9.90" } }]),
        "{now}"
    );
    ensure!(
        view["events"]
            == json!([{ "eventType": "Placed", "version": 1 }, { "eventType": "InventoryReserved", "version": 2 }]),
        "{now}"
    );
    let then = kernel
        .graphql(ORDER, json!({ "id": order.id, "v": 1 }))
        .await?;
    ensure!(
        then["data"]["order"]["status"] == "PENDING" && then["data"]["order"]["version"] == 1,
        "{then}"
    );

    let listed = kernel
        .graphql(
            r#"{ orders(status: INVENTORY_RESERVED, first: 5) { edges { node { id } } } }"#,
            json!({}),
        )
        .await?;
    ensure!(
        listed["data"]["orders"]["edges"][0]["node"]["id"] == json!(order.id),
        "{listed}"
    );
    // The order has no saga yet: cancelling starts one, which cancels the
    // order before any step.
    let cancelled = kernel
        .graphql(
            r#"mutation ($id: UUID!) { cancelOrder(id: $id, reason: "out of time") { saga { status reason } errors { code } } }"#,
            json!({ "id": order.id }),
        )
        .await?;
    ensure!(
        cancelled["data"]["cancelOrder"]["saga"]["reason"] == "out of time",
        "{cancelled}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = kernel
            .graphql(
                r#"query ($id: UUID!) { order(id: $id) { status reason saga { status steps { name status } } } }"#,
                json!({ "id": order.id }),
            )
            .await?;
        let view = &now["data"]["order"];
        if view["status"] == "CANCELLED" {
            ensure!(
                view["reason"] == "out of time" && view["saga"]["status"] == "COMPENSATED",
                "{now}"
            );
            ensure!(
                view["saga"]["steps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|step| step["status"] == "PENDING"),
                "cancelled before any step: {now}"
            );
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "never cancelled: {now}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = kernel
        .graphql(
            r#"mutation ($id: UUID!) { cancelOrder(id: $id, reason: "twice") { order { status } errors { code } } }"#,
            json!({ "id": order.id }),
        )
        .await?;
    ensure!(
        payload_codes(&again["data"]["cancelOrder"]) == ["ILLEGAL_TRANSITION"],
        "{again}"
    );
    let metrics = kernel.metrics().await?;
    ensure!(
        metrics.contains("commerce_inventory_conflicts_total ")
            && metrics.contains("commerce_saga_stock_turns_skipped_total 0"),
        "{metrics}"
    );
    kernel.stop().await
}

async fn graphql_carts_check_out_once_and_report_abandonment(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    let kernel = RunningKernel::start(&db, &[]).await?;
    let created = kernel
        .graphql(
            r#"mutation { createProduct(input: { sku: "POT-1", name: "Teapot", price: { amount: "19.99", currency: "EUR" } }) { product { id } errors { code } } }"#,
            json!({}),
        )
        .await?;
    let product = created["data"]["createProduct"]["product"]["id"].clone();
    ensure!(product.is_string(), "{created}");

    const CART_FIELDS: &str = "id status version currency itemCount subtotal { amount currency } \
        lines { productId quantity sku unitPrice { amount } lineTotal { amount } available } orderId expiresAt";
    let create = format!(
        "mutation ($items: [CartItemInput!]!) {{ createCart(input: {{ sessionId: \"visitor-1\", items: $items }}) \
         {{ cart {{ {CART_FIELDS} }} errors {{ field code message }} }} }}"
    );
    let cart = kernel
        .graphql(
            &create,
            json!({ "items": [{ "productId": product, "quantity": 2 }] }),
        )
        .await?;
    let view = &cart["data"]["createCart"]["cart"];
    ensure!(
        view["version"] == 1 && view["subtotal"]["amount"] == "39.98",
        "{cart}"
    );
    ensure!(view["lines"][0]["lineTotal"]["amount"] == "39.98", "{cart}");
    let cart_id = view["id"].clone();

    // ADD, a stale expectedVersion, and a refused quantity: typed errors in the payload.
    let upsert = format!(
        "mutation ($id: UUID!, $items: [CartItemInput!]!, $v: Int) {{ upsertCartItems(cartId: $id, items: $items, expectedVersion: $v) \
         {{ cart {{ {CART_FIELDS} }} errors {{ field code message }} }} }}"
    );
    let added = kernel
        .graphql(&upsert, json!({ "id": cart_id, "items": [{ "productId": product, "quantity": 1, "mode": "ADD" }], "v": 1 }))
        .await?;
    let view = &added["data"]["upsertCartItems"]["cart"];
    ensure!(
        view["version"] == 2 && view["itemCount"] == 3 && view["subtotal"]["amount"] == "59.97",
        "{added}"
    );
    let stale = kernel
        .graphql(
            &upsert,
            json!({ "id": cart_id, "items": [{ "productId": product, "quantity": 1 }], "v": 1 }),
        )
        .await?;
    ensure!(
        stale["data"]["upsertCartItems"]["errors"][0]["code"] == "VERSION_CONFLICT",
        "{stale}"
    );
    let too_many = kernel
        .graphql(
            &upsert,
            json!({ "id": cart_id, "items": [{ "productId": product, "quantity": 1000 }] }),
        )
        .await?;
    let error = &too_many["data"]["upsertCartItems"]["errors"][0];
    ensure!(
        error["code"] == "INVALID_INPUT" && error["field"] == "items.quantity",
        "{too_many}"
    );
    let unknown = kernel
        .graphql(
            &upsert,
            json!({ "id": Uuid::now_v7(), "items": [{ "productId": product, "quantity": 1 }] }),
        )
        .await?;
    ensure!(
        unknown["data"]["upsertCartItems"]["errors"][0]["code"] == "NOT_FOUND",
        "{unknown}"
    );

    const PLACE: &str = r#"mutation ($id: UUID!) { placeOrder(input: { cartId: $id, paymentMethod: "card", idempotencyKey: "checkout-1",
        shippingAddress: { name: "Ada", line1: "1 Main St", city: "Berlin", postalCode: "10115", country: "DE" } })
        { order { id status total { amount } customerId } cart { status orderId } errors { field code message } } }"#;
    let placed = kernel.graphql(PLACE, json!({ "id": cart_id })).await?;
    let payload = &placed["data"]["placeOrder"];
    ensure!(payload["errors"] == json!([]), "{placed}");
    // Placed PENDING; its saga starts at once and may already have moved it
    // on (this kernel has no payment plugin, so the saga ends FAILED).
    ensure!(
        ["PENDING", "INVENTORY_RESERVED", "FAILED"]
            .contains(&payload["order"]["status"].as_str().unwrap_or_default())
            && payload["order"]["total"]["amount"] == "59.97",
        "{placed}"
    );
    let saga = kernel
        .graphql(
            "query ($id: UUID!) { order(id: $id) { saga { orderId steps { name } } } }",
            json!({ "id": payload["order"]["id"] }),
        )
        .await?;
    ensure!(
        saga["data"]["order"]["saga"]["orderId"] == payload["order"]["id"],
        "placeOrder started the order's saga: {saga}"
    );
    ensure!(payload["cart"]["status"] == "CHECKED_OUT", "{placed}");
    ensure!(
        payload["cart"]["orderId"] == payload["order"]["id"],
        "{placed}"
    );
    let again = kernel.graphql(PLACE, json!({ "id": cart_id })).await?;
    ensure!(
        again["data"]["placeOrder"]["order"]["id"] == payload["order"]["id"],
        "one order: {again}"
    );
    let frozen = kernel
        .graphql(
            &upsert,
            json!({ "id": cart_id, "items": [{ "productId": product, "quantity": 1 }] }),
        )
        .await?;
    ensure!(
        frozen["data"]["upsertCartItems"]["errors"][0]["code"] == "CART_NOT_OPEN",
        "{frozen}"
    );

    // A second cart, left alone; the report sees it once the recorder has run.
    let left = kernel
        .graphql(
            &create,
            json!({ "items": [{ "productId": product, "quantity": 1 }] }),
        )
        .await?;
    let left_id = left["data"]["createCart"]["cart"]["id"].clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    const REPORT: &str = r#"query { abandonedCarts(hours: 0.00005) { edges { cursor node { cartId sessionId expired } } pageInfo { hasNextPage } totalCount abandonedCount checkedOutCount abandonmentRate expiredCount byIdleAge { idleFromHours idleUnderHours count } } }"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let report = loop {
        let report = kernel.graphql(REPORT, json!({})).await?;
        let counts = &report["data"]["abandonedCarts"];
        if (counts["abandonedCount"] == 1 && counts["checkedOutCount"] == 1)
            || tokio::time::Instant::now() > deadline
        {
            break report;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let view = &report["data"]["abandonedCarts"];
    ensure!(
        view["abandonedCount"] == 1 && view["checkedOutCount"] == 1,
        "{report}"
    );
    ensure!(view["abandonmentRate"] == 0.5, "{report}");
    ensure!(
        view["expiredCount"] == 0
            && view["byIdleAge"]
                == json!([
                    { "idleFromHours": 0, "idleUnderHours": 24, "count": 1 },
                    { "idleFromHours": 24, "idleUnderHours": 168, "count": 0 },
                    { "idleFromHours": 168, "idleUnderHours": 720, "count": 0 },
                    { "idleFromHours": 720, "idleUnderHours": null, "count": 0 },
                ]),
        "{report}"
    );
    let first = &view["edges"][0]["node"];
    ensure!(
        first["cartId"] == left_id && first["expired"] == false,
        "{report}"
    );
    ensure!(
        view["totalCount"] == 1 && view["pageInfo"]["hasNextPage"] == false,
        "{report}"
    );
    let bad = kernel
        .graphql(
            "query { abandonedCarts(hours: -1) { abandonedCount } }",
            json!({}),
        )
        .await?;
    ensure!(
        bad["errors"][0]["extensions"]["code"] == "INVALID_INPUT",
        "{bad}"
    );

    let read = kernel
        .graphql(
            &format!("query ($id: UUID!) {{ cart(id: $id) {{ {CART_FIELDS} }} }}"),
            json!({ "id": left_id }),
        )
        .await?;
    ensure!(read["data"]["cart"]["status"] == "OPEN", "{read}");
    let missing = kernel
        .graphql(
            "query ($id: UUID!) { cart(id: $id) { id } }",
            json!({ "id": Uuid::now_v7() }),
        )
        .await?;
    ensure!(missing["data"]["cart"].is_null(), "{missing}");
    kernel.stop().await
}

/// A manifest and base64 component for `installPlugin`.
fn plugin_upload(name: &str, version: &str, component_path: &str) -> anyhow::Result<Value> {
    use base64::Engine as _;
    let bytes = std::fs::read(component_path)?;
    let manifest = format!(
        "name = \"{name}\"\nversion = \"{version}\"\nkind = \"saga-step\"\n\
         component = \"{name}.wasm\"\nsha256 = \"{}\"\n",
        commerce_plugin_host::sha256_hex(&bytes)
    );
    Ok(json!({
        "manifest": manifest,
        "component": base64::engine::general_purpose::STANDARD.encode(&bytes),
    }))
}

async fn graphql_plugins_install_activate_roll_back_on_every_node(
    db: Arc<TestDatabase>,
) -> anyhow::Result<()> {
    use commerce_kernel::domain::plugin::PluginHistory;
    use commerce_kernel::event_store::StreamSelection;
    use commerce_plugin_artifacts as artifacts;

    // Two kernel processes sharing the database and the plugin directory.
    let shared = tempfile::tempdir()?;
    let dir = shared.path().display().to_string();
    let node_a = RunningKernel::start(&db, &[(config::PLUGINS_DIR, &dir)]).await?;
    let node_b = RunningKernel::start(&db, &[(config::PLUGINS_DIR, &dir)]).await?;

    const PLUGIN: &str = "name activeVersion { version sha256 } \
        versions { version kind sha256 limits { fuel timeoutMs memoryBytes } } \
        stats { invocations fuelConsumed errors { kind count } }";
    let install = format!(
        "mutation ($input: InstallPluginInput!) {{ installPlugin(input: $input) \
         {{ plugin {{ {PLUGIN} }} errors {{ field code message }} }} }}"
    );
    for (version, path) in [
        ("1.0.0", artifacts::ORDER_LIMIT),
        ("2.0.0", artifacts::MISBEHAVING),
    ] {
        let input = plugin_upload("check", version, path)?;
        let installed = node_a.graphql(&install, json!({ "input": input })).await?;
        let payload = &installed["data"]["installPlugin"];
        ensure!(payload["errors"] == json!([]), "{installed}");
        ensure!(
            payload["plugin"]["activeVersion"].is_null(),
            "installed, not active: {installed}"
        );
    }

    // Refusals name the field and change nothing.
    let mut tampered = plugin_upload("check", "3.0.0", artifacts::ORDER_LIMIT)?;
    tampered["component"] = json!(plugin_upload("x", "1", artifacts::MISBEHAVING)?["component"]);
    let refused = node_a
        .graphql(&install, json!({ "input": tampered }))
        .await?;
    ensure!(
        refused["data"]["installPlugin"]["errors"][0]["code"] == "PLUGIN_REJECTED"
            && refused["data"]["installPlugin"]["errors"][0]["field"] == "component",
        "{refused}"
    );
    let not_base64 = node_a
        .graphql(
            &install,
            json!({ "input": { "manifest": "", "component": "%%%" } }),
        )
        .await?;
    ensure!(
        not_base64["errors"][0]["extensions"]["code"] == "INVALID_INPUT",
        "{not_base64}"
    );

    let activate = format!(
        "mutation ($name: String!, $version: String!) {{ activatePlugin(input: {{ name: $name, version: $version }}) \
         {{ plugin {{ {PLUGIN} }} errors {{ field code message }} }} }}"
    );
    for version in ["1.0.0", "2.0.0"] {
        let activated = node_a
            .graphql(&activate, json!({ "name": "check", "version": version }))
            .await?;
        ensure!(
            activated["data"]["activatePlugin"]["plugin"]["activeVersion"]["version"] == version,
            "{activated}"
        );
    }
    let missing = node_a
        .graphql(&activate, json!({ "name": "check", "version": "9.9.9" }))
        .await?;
    ensure!(
        missing["data"]["activatePlugin"]["errors"][0]["code"] == "PLUGIN_REJECTED",
        "{missing}"
    );

    let rollback = format!(
        "mutation {{ rollbackPlugin(input: {{ name: \"check\" }}) {{ plugin {{ {PLUGIN} }} errors {{ code }} }} }}"
    );
    let rolled_back = node_a.graphql(&rollback, json!({})).await?;
    ensure!(
        rolled_back["data"]["rollbackPlugin"]["plugin"]["activeVersion"]["version"] == "1.0.0",
        "{rolled_back}"
    );
    let nothing_left = node_a.graphql(&rollback, json!({})).await?;
    ensure!(
        nothing_left["data"]["rollbackPlugin"]["errors"][0]["code"] == "INVALID_INPUT",
        "{nothing_left}"
    );

    // Every change is an event naming the version, its sha256 and the actor.
    let history = db
        .event_store()
        .read_stream(
            PluginHistory::stream_id("check"),
            StreamSelection::default(),
        )
        .await?;
    let types: Vec<&str> = history.iter().map(|e| e.event_type.as_str()).collect();
    ensure!(
        types
            == [
                "PluginInstalled",
                "PluginInstalled",
                "PluginActivated",
                "PluginActivated",
                "PluginRolledBack"
            ],
        "{types:?}"
    );
    let order_limit_sha = commerce_plugin_host::sha256_hex(&std::fs::read(artifacts::ORDER_LIMIT)?);
    ensure!(
        history[2].data["sha256"] == order_limit_sha.as_str(),
        "{:?}",
        history[2].data
    );
    ensure!(history[4].data["version"] == "1.0.0" && history[4].data["from_version"] == "2.0.0");
    ensure!(history.iter().all(|e| e.metadata.actor.is_some()));

    // The other process follows: it ends on the version rolled back to.
    let listing =
        "{ plugins { totalCount edges { cursor node { name activeVersion { version } } } } }";
    let deadline = tokio::time::Instant::now() + commerce_kernel::commerce::FOLLOW_INTERVAL * 5;
    loop {
        let seen = node_b.graphql(listing, json!({})).await?;
        let plugins = &seen["data"]["plugins"];
        if plugins["edges"][0]["node"]["activeVersion"]["version"] == "1.0.0" {
            // `check`, and the kernel's bundled versions, none active here.
            ensure!(
                plugins["totalCount"]
                    == 1 + commerce_kernel::commerce::bundled_plugins::BUNDLED.len(),
                "{seen}"
            );
            ensure!(plugins["edges"][0]["cursor"] == plugins["edges"][0]["node"]["name"]);
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "node B never followed: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = node_a.metrics().await?;
    ensure!(
        metrics.contains("commerce_plugin_invocations_total"),
        "{metrics}"
    );

    node_b.stop().await?;
    node_a.stop().await
}
