//! Who may do what through the API.
//!
//! Every request carries the [`Principal`] its bearer token names (put into
//! the request data by [`crate::server`]). Admin-only fields use the
//! [`AdminOnly`] guard. Customer-facing fields check ownership themselves and
//! answer another customer's cart or order exactly as they answer an id that
//! does not exist, so ids cannot be probed.

use std::collections::HashSet;

use async_graphql::{Context, Guard};
use uuid::Uuid;

use super::ApiError;
use super::error::{UserError, user_error};
use crate::auth::Principal;
use crate::commerce::{Carts, CommandContext, CommandError, Commerce};
use crate::domain::DomainError;

/// The caller of this request; a schema executed without one refuses.
pub(crate) fn principal<'a>(ctx: &Context<'a>) -> Result<&'a Principal, ApiError> {
    ctx.data_opt::<Principal>().ok_or(ApiError::Unauthenticated)
}

/// The caller, who must be an admin.
pub(crate) fn admin<'a>(ctx: &Context<'a>) -> Result<&'a Principal, ApiError> {
    let principal = principal(ctx)?;
    if principal.is_admin() {
        Ok(principal)
    } else {
        Err(ApiError::Forbidden)
    }
}

/// Restricts a field to admins (FORBIDDEN for customers).
pub struct AdminOnly;

impl Guard for AdminOnly {
    async fn check(&self, ctx: &Context<'_>) -> async_graphql::Result<()> {
        admin(ctx).map(|_| ()).map_err(Into::into)
    }
}

/// The correlation id of one HTTP request, which its commands record and
/// its log lines carry. (Operations over a WebSocket have none: each of
/// their commands gets a fresh one.)
#[derive(Clone, Copy, Debug)]
pub struct Correlation(pub Uuid);

impl Correlation {
    pub fn new() -> Correlation {
        Correlation(Uuid::now_v7())
    }
}

impl Default for Correlation {
    fn default() -> Self {
        Correlation::new()
    }
}

/// How commands record this request: the caller as actor, the request's
/// correlation id (a fresh one where the request has none).
pub(crate) fn command_context(ctx: &Context<'_>) -> Result<CommandContext, ApiError> {
    let correlation = ctx.data_opt::<Correlation>().copied().unwrap_or_default();
    Ok(CommandContext {
        actor: Some(principal(ctx)?.actor()),
        correlation_id: Some(correlation.0),
    })
}

/// Whether the caller may see what belongs to the customer `customer_id`
/// (a cart or an order).
pub(crate) fn may_access(ctx: &Context<'_>, customer_id: Uuid) -> Result<bool, ApiError> {
    Ok(principal(ctx)?.may_access(customer_id))
}

/// `None` when the caller may act on the order; otherwise the refusal an
/// order that does not exist gets. Reads the order's events, not the read
/// model, which may lag behind an order just placed.
pub(crate) async fn order_refusal(
    ctx: &Context<'_>,
    order_id: Uuid,
) -> Result<Option<UserError>, ApiError> {
    if principal(ctx)?.is_admin() {
        return Ok(None);
    }
    let owner = match ctx.data_unchecked::<Commerce>().load_order(order_id).await {
        Ok(order) => order.state.placed.map(|placed| placed.customer_id),
        Err(CommandError::Domain(DomainError::NotFound { .. })) => None,
        Err(other) => return Err(super::error::command_failure(other)),
    };
    match owner {
        Some(customer) if may_access(ctx, customer)? => Ok(None),
        _ => Ok(Some(not_found("order", order_id)?)),
    }
}

/// `None` when the caller may act on the cart; otherwise the refusal a cart
/// that does not exist gets.
pub(crate) async fn cart_refusal(
    ctx: &Context<'_>,
    cart_id: Uuid,
) -> Result<Option<UserError>, ApiError> {
    if principal(ctx)?.is_admin() {
        return Ok(None);
    }
    let cart = ctx
        .data_unchecked::<Carts>()
        .cart(cart_id)
        .await
        .map_err(super::error::command_failure)?;
    match cart {
        Some(cart) if may_access(ctx, cart.owner.order_customer_id())? => Ok(None),
        _ => Ok(Some(not_found("cart", cart_id)?)),
    }
}

fn not_found(kind: &'static str, id: Uuid) -> Result<UserError, ApiError> {
    user_error(DomainError::NotFound { kind, id }.into())
}

/// The most root-level selections (fields, spreads, inline fragments) an
/// anonymous document may hold; a storefront's catalog query has a handful.
const MAX_ANONYMOUS_SELECTIONS: usize = 256;

/// What a request without a token may run, as configured
/// ([`crate::config::StorefrontConfig`]).
#[derive(Clone, Copy, Debug)]
pub struct AnonymousAccess {
    /// `product`, `products` and `inventory`.
    pub catalog: bool,
    /// `createGuestSession`.
    pub guest_sessions: bool,
}

impl AnonymousAccess {
    /// Whether every operation of `request` selects, at its root, only
    /// fields open to callers without a token (fragments followed). A
    /// document that does not parse passes: executing it reports why, and
    /// reads nothing.
    ///
    /// This is the gate for anonymous requests; below the root, fields that
    /// need a caller refuse one without a principal as before
    /// ([`principal`]), so a public field's admin-only child stays closed.
    pub fn allows(self, request: &mut async_graphql::Request) -> bool {
        use async_graphql::parser::types::{DocumentOperations, OperationType};
        let operation_name = request.operation_name.clone();
        // Parsed once: the request keeps the document for its execution.
        let Ok(document) = request.parsed_query() else {
            return true;
        };
        let operations: Vec<_> = match &document.operations {
            DocumentOperations::Single(operation) => vec![&operation.node],
            DocumentOperations::Multiple(operations) => match &operation_name {
                Some(name) => operations
                    .iter()
                    .filter(|(n, _)| n.as_str() == name)
                    .map(|(_, operation)| &operation.node)
                    .collect(),
                None => operations
                    .values()
                    .map(|operation| &operation.node)
                    .collect(),
            },
        };
        operations.into_iter().all(|operation| {
            let open: &[&str] = match operation.ty {
                OperationType::Query if self.catalog => &[
                    "product",
                    "products",
                    "inventory",
                    "__typename",
                    "__schema",
                    "__type",
                ],
                OperationType::Query => &["__typename", "__schema", "__type"],
                OperationType::Mutation if self.guest_sessions => {
                    &["createGuestSession", "__typename"]
                }
                OperationType::Mutation | OperationType::Subscription => &[],
            };
            let mut names = HashSet::new();
            let mut visited = HashSet::new();
            root_field_names(
                document,
                &operation.selection_set.node,
                &mut visited,
                &mut names,
            ) && !names.is_empty()
                && names.iter().all(|name| open.contains(name))
        })
    }
}

/// The field names a root selection set selects, through fragment spreads
/// and inline fragments. Each named fragment is read once however often it
/// is spread (a document that spreads fragments into each other twice per
/// level would otherwise cost 2^depth); false when the selections go more
/// than [`MAX_ANONYMOUS_SELECTIONS`] deep or wide, or a spread names a
/// fragment the document does not have.
fn root_field_names<'a>(
    document: &'a async_graphql::parser::types::ExecutableDocument,
    selection_set: &'a async_graphql::parser::types::SelectionSet,
    visited: &mut HashSet<&'a str>,
    names: &mut HashSet<&'a str>,
) -> bool {
    use async_graphql::parser::types::Selection;
    let mut pending = vec![selection_set];
    let mut read = 0usize;
    while let Some(selection_set) = pending.pop() {
        for selection in &selection_set.items {
            read += 1;
            if read > MAX_ANONYMOUS_SELECTIONS {
                return false;
            }
            match &selection.node {
                Selection::Field(field) => {
                    names.insert(field.node.name.node.as_str());
                }
                Selection::InlineFragment(fragment) => {
                    pending.push(&fragment.node.selection_set.node);
                }
                Selection::FragmentSpread(spread) => {
                    let name = spread.node.fragment_name.node.as_str();
                    if visited.insert(name) {
                        // An unknown fragment: refused, not skipped.
                        let Some(fragment) =
                            document.fragments.get(&spread.node.fragment_name.node)
                        else {
                            return false;
                        };
                        pending.push(&fragment.node.selection_set.node);
                    }
                }
            }
        }
    }
    true
}
