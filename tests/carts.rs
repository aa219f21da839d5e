//! The cart suite: one set of cases run against the embedded cart store (with
//! SQLite) and, with `COMMERCE_TEST_REDIS_URL`, against Redis (with Postgres
//! when `COMMERCE_TEST_DATABASE_URL` is set too).

#[macro_use]
mod support;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use chrono::{DateTime, Utc};
use commerce_kernel::carts::{self, ActivityRecorder, CartStore};
use commerce_kernel::commerce::{
    CartItem, Carts, CheckoutInput, CommandContext, CommandError, Commerce, NewCart, NewProduct,
};
use commerce_kernel::domain::DomainError;
use commerce_kernel::domain::cart::{CartLimits, CartOwner, CartStatus, QuantityMode};
use commerce_kernel::domain::catalog::ProductUpdate;
use commerce_kernel::domain::money::{Currency, Money};
use commerce_kernel::domain::order::{Address, OrderStatus};
use support::{TestCartStore, TestDatabase, run_cart_suite};
use uuid::Uuid;

fn main() {
    run_cart_suite(&cart_cases![
        carts_are_priced_from_the_catalog_when_read,
        every_change_bumps_the_version_and_stale_versions_change_nothing,
        invalid_items_are_refused_with_typed_errors,
        fifty_concurrent_adds_lose_nothing,
        carts_expire_unless_written_within_their_ttl,
        checkout_places_exactly_one_order,
        a_refused_checkout_leaves_the_cart_open,
        abandoned_carts_and_the_abandonment_rate,
    ]);
}

fn limits() -> CartLimits {
    CartLimits {
        max_lines: 3,
        ttl: chrono::Duration::hours(1),
    }
}

fn services(db: &TestDatabase, store: Arc<dyn CartStore>, limits: CartLimits) -> Carts {
    let commerce = Commerce::new(db.event_store(), db.database.view_store());
    Carts::new(commerce, store, limits)
}

fn commerce_of(db: &TestDatabase) -> Commerce {
    Commerce::new(db.event_store(), db.database.view_store())
}

fn context() -> CommandContext {
    CommandContext {
        actor: Some("test".into()),
        correlation_id: None,
    }
}

fn money(amount: &str, currency: &str) -> anyhow::Result<Money> {
    Ok(Money::new(amount.parse()?, Currency::parse(currency)?)?)
}

async fn product(commerce: &Commerce, price: &str, currency: &str) -> anyhow::Result<Uuid> {
    let created = commerce
        .create_product(
            NewProduct {
                sku: format!("SKU-{}", Uuid::now_v7().simple()),
                name: "Teapot".into(),
                price: money(price, currency)?,
                active: true,
            },
            &context(),
        )
        .await?;
    Ok(created.id)
}

async fn deactivate(commerce: &Commerce, product_id: Uuid) -> anyhow::Result<()> {
    let update = ProductUpdate {
        active: Some(false),
        ..ProductUpdate::default()
    };
    commerce
        .update_product(product_id, update, None, &context())
        .await?;
    Ok(())
}

fn set(product_id: Uuid, quantity: u32) -> CartItem {
    CartItem {
        product_id,
        quantity,
        mode: QuantityMode::Set,
    }
}

fn add(product_id: Uuid, quantity: u32) -> CartItem {
    CartItem {
        mode: QuantityMode::Add,
        ..set(product_id, quantity)
    }
}

fn customer_cart(items: Vec<CartItem>) -> NewCart {
    NewCart {
        owner: CartOwner::Customer(Uuid::now_v7()),
        currency: None,
        items,
    }
}

fn checkout_input(cart_id: Uuid, key: &str) -> CheckoutInput {
    CheckoutInput {
        cart_id,
        payment_method: "card".into(),
        shipping_address: Address {
            name: "Ada Lovelace".into(),
            line1: "12 St James's Square".into(),
            line2: None,
            city: "London".into(),
            postal_code: "SW1Y 4JH".into(),
            region: None,
            country: "GB".into(),
        },
        idempotency_key: Some(key.into()),
        email: None,
    }
}

/// Tells whether a refusal is the one expected.
type RefusalCheck = fn(&DomainError) -> bool;

/// The domain refusal inside a command error, or a failure naming what came instead.
fn refusal<T: std::fmt::Debug>(result: Result<T, CommandError>) -> anyhow::Result<DomainError> {
    match result {
        Err(CommandError::Domain(refusal)) => Ok(refusal),
        other => bail!("expected a domain refusal, got {other:?}"),
    }
}

async fn carts_are_priced_from_the_catalog_when_read(
    db: Arc<TestDatabase>,
    carts: Arc<TestCartStore>,
) -> anyhow::Result<()> {
    let service = services(&db, Arc::clone(&carts.store), limits());
    let commerce = commerce_of(&db);
    let pot = product(&commerce, "19.99", "EUR").await?;
    let cup = product(&commerce, "0.10", "EUR").await?;
    let cart = service
        .create_cart(customer_cart(vec![set(pot, 3), set(cup, 7)]))
        .await?;
    ensure!(cart.version == 1 && cart.status == CartStatus::Open);

    let loaded = service.cart(cart.id).await?.context("cart just created")?;
    ensure!(loaded == cart, "the store returns what was written");
    let priced = service.price(loaded.clone()).await?;
    ensure!(
        priced.subtotal == Some(money("60.67", "EUR")?),
        "{:?}",
        priced.subtotal
    );
    let pot_line = priced
        .lines
        .iter()
        .find(|l| l.product_id == pot)
        .context("pot line")?;
    ensure!(pot_line.line_total == Some(money("59.97", "EUR")?));

    // A price change shows at the next read; a deactivated product drops out of the subtotal.
    commerce
        .update_product(
            pot,
            ProductUpdate {
                price: Some(money("20.00", "EUR")?),
                ..ProductUpdate::default()
            },
            None,
            &context(),
        )
        .await?;
    deactivate(&commerce, cup).await?;
    let priced = service.price(loaded).await?;
    ensure!(
        priced.subtotal == Some(money("60.00", "EUR")?),
        "{:?}",
        priced.subtotal
    );
    let cup_line = priced
        .lines
        .iter()
        .find(|l| l.product_id == cup)
        .context("cup line")?;
    ensure!(cup_line.line_total.is_none() && cup_line.unavailable_reason.is_some());

    ensure!(
        service.cart(Uuid::now_v7()).await?.is_none(),
        "unknown carts are not found"
    );
    Ok(())
}

async fn every_change_bumps_the_version_and_stale_versions_change_nothing(
    db: Arc<TestDatabase>,
    carts: Arc<TestCartStore>,
) -> anyhow::Result<()> {
    let service = services(&db, Arc::clone(&carts.store), limits());
    let commerce = commerce_of(&db);
    let (a, b) = (
        product(&commerce, "5.00", "EUR").await?,
        product(&commerce, "7.00", "EUR").await?,
    );
    let cart = service.create_cart(customer_cart(Vec::new())).await?;
    ensure!(cart.version == 1 && cart.lines.is_empty() && cart.currency.is_none());

    let cart = service
        .change_items(cart.id, &[set(a, 2), add(b, 1)], Some(1))
        .await?;
    ensure!(cart.version == 2 && cart.lines.len() == 2);
    let cart = service.change_items(cart.id, &[add(b, 4)], None).await?;
    ensure!(cart.version == 3 && cart.lines.get(&b) == Some(&5));

    // Quantity 0 removes the line.
    let cart = service.change_items(cart.id, &[set(a, 0)], Some(3)).await?;
    ensure!(cart.version == 4 && !cart.lines.contains_key(&a));

    // A stale version is refused and nothing changes.
    let stale = service.change_items(cart.id, &[set(b, 9)], Some(2)).await;
    match stale {
        Err(CommandError::VersionConflict {
            expected: 2,
            actual: 4,
            ..
        }) => {}
        other => bail!("expected a version conflict, got {other:?}"),
    }
    let stale_remove = service.remove_item(cart.id, b, Some(3)).await;
    ensure!(matches!(
        stale_remove,
        Err(CommandError::VersionConflict { .. })
    ));
    let stale_clear = service.clear(cart.id, Some(1)).await;
    ensure!(matches!(
        stale_clear,
        Err(CommandError::VersionConflict { .. })
    ));
    let unchanged = service.cart(cart.id).await?.context("cart")?;
    ensure!(unchanged == cart, "a refused change wrote nothing");

    let cart = service.remove_item(cart.id, b, Some(4)).await?;
    ensure!(cart.version == 5 && cart.lines.is_empty());
    ensure!(matches!(
        refusal(service.remove_item(cart.id, b, None).await)?,
        DomainError::NotFound { .. }
    ));
    let cart = service.change_items(cart.id, &[set(a, 1)], None).await?;
    let cart = service.clear(cart.id, Some(6)).await?;
    ensure!(cart.version == 7 && cart.lines.is_empty());
    ensure!(service.cart(cart.id).await?.as_ref() == Some(&cart));
    Ok(())
}

async fn invalid_items_are_refused_with_typed_errors(
    db: Arc<TestDatabase>,
    carts: Arc<TestCartStore>,
) -> anyhow::Result<()> {
    let service = services(&db, Arc::clone(&carts.store), limits());
    let commerce = commerce_of(&db);
    let euro = product(&commerce, "1.00", "EUR").await?;
    let dollar = product(&commerce, "1.00", "USD").await?;
    let retired = product(&commerce, "1.00", "EUR").await?;
    deactivate(&commerce, retired).await?;
    let cart = service
        .create_cart(customer_cart(vec![set(euro, 998)]))
        .await?;

    let unknown = Uuid::now_v7();
    let cases: Vec<(Vec<CartItem>, RefusalCheck)> = vec![
        (vec![set(unknown, 1)], |e| {
            matches!(
                e,
                DomainError::NotFound {
                    kind: "product",
                    ..
                }
            )
        }),
        (vec![set(retired, 1)], |e| {
            matches!(e, DomainError::ProductInactive { .. })
        }),
        (vec![set(euro, 1000)], |e| {
            matches!(
                e,
                DomainError::Invalid {
                    field: "items.quantity",
                    ..
                }
            )
        }),
        (vec![add(euro, 2)], |e| {
            matches!(
                e,
                DomainError::Invalid {
                    field: "items.quantity",
                    ..
                }
            )
        }),
        (vec![add(euro, 0)], |e| {
            matches!(
                e,
                DomainError::Invalid {
                    field: "items.quantity",
                    ..
                }
            )
        }),
        (vec![set(dollar, 1)], |e| {
            matches!(e, DomainError::CurrencyMismatch { .. })
        }),
        (vec![set(euro, 1), set(euro, 2)], |e| {
            matches!(e, DomainError::Invalid { field: "items", .. })
        }),
    ];
    for (items, expected) in cases {
        let refused = refusal(service.change_items(cart.id, &items, None).await)?;
        ensure!(expected(&refused), "{items:?} gave {refused:?}");
    }
    // Too many lines: the limit is 3 and the cart holds 1.
    let mut more = Vec::new();
    for _ in 0..3 {
        more.push(set(product(&commerce, "2.00", "EUR").await?, 1));
    }
    let refused = refusal(service.change_items(cart.id, &more, None).await)?;
    ensure!(
        matches!(refused, DomainError::Invalid { field: "items", .. }),
        "{refused:?}"
    );
    // Removing a line never needs a sellable product.
    ensure!(
        service.cart(cart.id).await?.as_ref() == Some(&cart),
        "nothing was written"
    );
    let emptied = service.change_items(cart.id, &[set(euro, 0)], None).await?;
    ensure!(emptied.lines.is_empty() && emptied.currency.is_none());
    // Creation validates too, and writes no cart.
    ensure!(matches!(
        refusal(
            service
                .create_cart(customer_cart(vec![set(unknown, 1)]))
                .await
        )?,
        DomainError::NotFound { .. }
    ));
    Ok(())
}

async fn fifty_concurrent_adds_lose_nothing(
    db: Arc<TestDatabase>,
    carts: Arc<TestCartStore>,
) -> anyhow::Result<()> {
    // Two "processes": for Redis a second connection of its own; the
    // embedded store is one process's memory by definition.
    let second_store = match carts.kind {
        support::CartBackendKind::Redis => carts::open(&carts.config).await?,
        support::CartBackendKind::Embedded => Arc::clone(&carts.store),
    };
    let first = services(&db, Arc::clone(&carts.store), limits());
    let second = services(&db, second_store, limits());
    let commerce = commerce_of(&db);
    let mug = product(&commerce, "3.50", "EUR").await?;
    let cart = first.create_cart(customer_cart(Vec::new())).await?;

    let mut tasks = Vec::new();
    for client in 0..50 {
        let service = if client % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        let cart_id = cart.id;
        tasks.push(tokio::spawn(async move {
            service.change_items(cart_id, &[add(mug, 1)], None).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    let cart = first.cart(cart.id).await?.context("cart")?;
    ensure!(cart.lines.get(&mug) == Some(&50), "lines: {:?}", cart.lines);
    ensure!(
        cart.version == 51,
        "one version per change: {}",
        cart.version
    );
    let priced = first.price(cart).await?;
    ensure!(priced.subtotal == Some(money("175.00", "EUR")?));
    Ok(())
}

async fn carts_expire_unless_written_within_their_ttl(
    db: Arc<TestDatabase>,
    carts: Arc<TestCartStore>,
) -> anyhow::Result<()> {
    let ttl = chrono::Duration::milliseconds(1500);
    let service = services(
        &db,
        Arc::clone(&carts.store),
        CartLimits { max_lines: 3, ttl },
    );
    let commerce = commerce_of(&db);
    let mug = product(&commerce, "3.50", "EUR").await?;
    let cart = service
        .create_cart(customer_cart(vec![set(mug, 1)]))
        .await?;
    ensure!(cart.expires_at == cart.updated_at + ttl);

    // Each write renews the TTL: written every 0.9 s, it outlives 1.5 s.
    for quantity in 2..=3 {
        tokio::time::sleep(Duration::from_millis(900)).await;
        let renewed = service
            .change_items(cart.id, &[set(mug, quantity)], None)
            .await?;
        ensure!(renewed.expires_at > cart.expires_at);
    }
    ensure!(
        service.cart(cart.id).await?.is_some(),
        "written within its TTL"
    );

    // Left alone past its TTL: not found (never an empty cart), and no write revives it.
    tokio::time::sleep(Duration::from_millis(1700)).await;
    ensure!(
        service.cart(cart.id).await?.is_none(),
        "expired carts are not found"
    );
    for refused in [
        service.change_items(cart.id, &[set(mug, 1)], None).await,
        service.clear(cart.id, None).await,
    ] {
        ensure!(matches!(
            refusal(refused)?,
            DomainError::NotFound { kind: "cart", .. }
        ));
    }
    let checkout = service
        .checkout(&checkout_input(cart.id, "late"), &context())
        .await;
    ensure!(matches!(
        refusal(checkout)?,
        DomainError::NotFound { kind: "cart", .. }
    ));
    Ok(())
}

async fn checkout_places_exactly_one_order(
    db: Arc<TestDatabase>,
    carts: Arc<TestCartStore>,
) -> anyhow::Result<()> {
    let service = services(&db, Arc::clone(&carts.store), limits());
    let commerce = commerce_of(&db);
    let pot = product(&commerce, "19.99", "EUR").await?;

    // Twice in a row: one order, the same both times.
    let cart = service
        .create_cart(customer_cart(vec![set(pot, 2)]))
        .await?;
    let first = service
        .checkout(&checkout_input(cart.id, "k-1"), &context())
        .await?;
    let again = service
        .checkout(&checkout_input(cart.id, "k-2"), &context())
        .await?;
    ensure!(first.order.id == again.order.id);
    ensure!(first.cart.status == CartStatus::CheckedOut);
    ensure!(first.cart.order_id == Some(first.order.id));
    let placed = first.order.state.placed.as_ref().context("placed")?;
    ensure!(first.order.state.status == Some(OrderStatus::Pending));
    ensure!(placed.idempotency_key.as_deref() == Some("k-1"));
    ensure!(placed.payment_method == "card" && placed.shipping_address.country == "GB");
    ensure!(placed.total == money("39.98", "EUR")?);
    let CartOwner::Customer(customer) = cart.owner else {
        bail!("customer cart")
    };
    ensure!(placed.customer_id == customer);

    // Checked out: immutable.
    for refused in [
        service.change_items(cart.id, &[set(pot, 1)], None).await,
        service.remove_item(cart.id, pot, None).await,
        service.clear(cart.id, None).await,
    ] {
        ensure!(matches!(
            refusal(refused)?,
            DomainError::CartNotOpen {
                status: CartStatus::CheckedOut,
                ..
            }
        ));
    }

    // Eight at once, for an anonymous session's cart: still one order.
    let guest = service
        .create_cart(NewCart {
            owner: CartOwner::session("visitor-42")?,
            currency: None,
            items: vec![set(pot, 1)],
        })
        .await?;
    let mut attempts = Vec::new();
    for attempt in 0..8 {
        let service = service.clone();
        let input = checkout_input(guest.id, &format!("guest-{attempt}"));
        attempts.push(tokio::spawn(async move {
            service.checkout(&input, &context()).await
        }));
    }
    let mut order_ids = Vec::new();
    for attempt in attempts {
        order_ids.push(attempt.await??.order.id);
    }
    order_ids.dedup();
    ensure!(order_ids.len() == 1, "one order: {order_ids:?}");
    let orders = db
        .event_store()
        .read_stream(order_ids[0], Default::default())
        .await?;
    ensure!(orders.len() == 1, "placed once: {} events", orders.len());
    let order = commerce.load_order(order_ids[0]).await?;
    let placed = order.state.placed.context("placed")?;
    ensure!(placed.customer_id == CartOwner::session("visitor-42")?.order_customer_id());
    let guest = service.cart(guest.id).await?.context("guest cart")?;
    ensure!(guest.status == CartStatus::CheckedOut && guest.order_id == Some(order_ids[0]));
    Ok(())
}

async fn a_refused_checkout_leaves_the_cart_open(
    db: Arc<TestDatabase>,
    carts: Arc<TestCartStore>,
) -> anyhow::Result<()> {
    let service = services(&db, Arc::clone(&carts.store), limits());
    let commerce = commerce_of(&db);
    let pot = product(&commerce, "19.99", "EUR").await?;

    let empty = service.create_cart(customer_cart(Vec::new())).await?;
    let refused = refusal(
        service
            .checkout(&checkout_input(empty.id, "e"), &context())
            .await,
    )?;
    ensure!(
        matches!(
            refused,
            DomainError::Invalid {
                field: "cartId",
                ..
            }
        ),
        "{refused:?}"
    );

    let cart = service
        .create_cart(customer_cart(vec![set(pot, 1)]))
        .await?;
    let mut bad_address = checkout_input(cart.id, "a");
    bad_address.shipping_address.country = "Britain".into();
    let refused = refusal(service.checkout(&bad_address, &context()).await)?;
    ensure!(
        matches!(
            refused,
            DomainError::Invalid {
                field: "shippingAddress.country",
                ..
            }
        ),
        "{refused:?}"
    );
    deactivate(&commerce, pot).await?;
    let refused = refusal(
        service
            .checkout(&checkout_input(cart.id, "b"), &context())
            .await,
    )?;
    ensure!(
        matches!(refused, DomainError::ProductInactive { .. }),
        "{refused:?}"
    );

    let unchanged = service.cart(cart.id).await?.context("cart")?;
    ensure!(
        unchanged == cart,
        "refused checkouts write nothing: {unchanged:?}"
    );
    ensure!(
        db.event_store()
            .read_stream(cart.order_id(), Default::default())
            .await?
            .is_empty(),
        "no order was placed"
    );
    // Fixed, it goes through.
    let cart = service.change_items(cart.id, &[set(pot, 0)], None).await?;
    let mug = product(&commerce, "3.00", "EUR").await?;
    service.change_items(cart.id, &[set(mug, 2)], None).await?;
    let done = service
        .checkout(&checkout_input(cart.id, "c"), &context())
        .await?;
    ensure!(done.order.state.placed.context("placed")?.total == money("6.00", "EUR")?);
    Ok(())
}

async fn abandoned_carts_and_the_abandonment_rate(
    db: Arc<TestDatabase>,
    carts: Arc<TestCartStore>,
) -> anyhow::Result<()> {
    let service = services(&db, Arc::clone(&carts.store), limits());
    let commerce = commerce_of(&db);
    let log = db.database.cart_activity();
    let recorder = ActivityRecorder::new(Arc::clone(&carts.store), Arc::clone(&log));
    let pot = product(&commerce, "19.99", "EUR").await?;

    let left_1 = service
        .create_cart(customer_cart(vec![set(pot, 1)]))
        .await?;
    let left_2 = service
        .create_cart(NewCart {
            owner: CartOwner::session("visitor-7")?,
            currency: None,
            items: vec![set(pot, 2)],
        })
        .await?;
    let bought = service
        .create_cart(customer_cart(vec![set(pot, 1)]))
        .await?;
    let busy = service
        .create_cart(customer_cart(vec![set(pot, 1)]))
        .await?;
    service
        .checkout(&checkout_input(bought.id, "x"), &context())
        .await?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let cutoff = Utc::now() - chrono::Duration::milliseconds(1000);
    // Touched after the cutoff: still active, not abandoned.
    service.change_items(busy.id, &[add(pot, 1)], None).await?;

    // Redis only: an entry the kernel did not write (corrupt, or some other
    // writer's) is dropped instead of holding up the queue forever.
    if let carts::CartBackendConfig::Redis { url, key_prefix } = &carts.config {
        let mut redis = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        redis::cmd("XADD")
            .arg(format!("{key_prefix}cart-activity"))
            .arg("*")
            .arg("activity")
            .arg("{not json")
            .query_async::<String>(&mut redis)
            .await?;
    }

    // Nothing is in the record until the recorder has moved it.
    let recorded = recorder.record_all().await?;
    ensure!(recorded >= 7, "every write queued its activity: {recorded}");
    ensure!(
        recorder.record_all().await? == 0,
        "acknowledged entries are gone"
    );

    let report = log.abandoned(Utc::now(), cutoff, None, 10).await?;
    let listed: Vec<Uuid> = report.carts.iter().map(|c| c.cart_id).collect();
    ensure!(
        listed == vec![left_1.id, left_2.id],
        "oldest first: {listed:?}"
    );
    ensure!(
        report.abandoned == 2 && report.checked_out == 1 && report.active == 1,
        "{report:?}"
    );
    ensure!(
        report.by_idle_age == [2, 0, 0, 0] && report.expired == 0,
        "{report:?}"
    );
    let rate = report.abandonment_rate().context("rate")?;
    ensure!((rate - 2.0 / 3.0).abs() < 1e-9, "rate {rate}");
    let session = &report.carts[1];
    ensure!(session.owner == CartOwner::Session("visitor-7".into()) && session.line_count == 1);
    ensure!(session.last_activity_at == left_2.updated_at);

    // Paging walks the same list; recording again changes nothing.
    let cursor = carts::AbandonedCursor {
        last_activity_at: report.carts[0].last_activity_at,
        cart_id: report.carts[0].cart_id,
    };
    let page = log.abandoned(Utc::now(), cutoff, Some(cursor), 10).await?;
    ensure!(page.carts.iter().map(|c| c.cart_id).collect::<Vec<_>>() == vec![left_2.id]);
    let bought_again = service.cart(bought.id).await?.context("bought")?;
    log.record(&[
        carts::CartActivity::of(&left_1),
        carts::CartActivity::of(&bought_again),
    ])
    .await?;
    ensure!(
        log.abandoned(Utc::now(), cutoff, None, 10).await? == report,
        "recording is idempotent"
    );

    // Abandonment by idle age, as a record kept for a while shows it:
    // carts left two, ten and forty days ago (expired since), one left
    // two days ago that would have lived longer, and one bought long ago.
    // Whole microseconds, as the record keeps times.
    let now = DateTime::from_timestamp_micros(Utc::now().timestamp_micros()).context("now")?;
    let days = |n: i64| now - chrono::Duration::days(n);
    let aged = |idle_days: i64, expires: DateTime<Utc>, bought: bool| carts::CartActivity {
        cart_id: Uuid::now_v7(),
        owner: CartOwner::Session("visitor-old".into()),
        status: if bought {
            CartStatus::CheckedOut
        } else {
            CartStatus::Open
        },
        version: 2,
        line_count: 1,
        created_at: days(idle_days + 1),
        updated_at: days(idle_days),
        expires_at: expires,
        order_id: bought.then(Uuid::now_v7),
    };
    log.record(&[
        aged(2, days(1), false),
        aged(2, now + chrono::Duration::days(5), false),
        aged(10, days(9), false),
        aged(40, days(39), false),
        aged(50, days(49), true),
    ])
    .await?;
    let by_age = log.abandoned(now, cutoff, None, 10).await?;
    ensure!(
        by_age.abandoned == 6 && by_age.checked_out == 2 && by_age.active == 1,
        "{by_age:?}"
    );
    ensure!(
        by_age.by_idle_age == [2, 2, 1, 1] && by_age.expired == 3,
        "{by_age:?}"
    );
    ensure!(
        by_age.carts.first().map(|cart| cart.last_activity_at) == Some(days(40)),
        "oldest first: {by_age:?}"
    );
    Ok(())
}
