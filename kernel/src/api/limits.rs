//! Bounds a GraphQL document must stay within beyond async-graphql's own
//! depth and complexity limits (set in [`super::build_schema`]).

use std::collections::HashMap;
use std::sync::Arc;

use async_graphql::extensions::{
    Extension, ExtensionContext, ExtensionFactory, NextParseQuery, NextPrepareRequest,
};
use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::{Request, ServerError, ServerResult, Variables};

/// Refuses documents with more than this many aliased fields. Aliases let
/// one request ask for the same expensive field many times over; the
/// complexity limit counts them too, but a document made only of aliases
/// is never a real client's.
pub struct AliasLimit(pub usize);

impl ExtensionFactory for AliasLimit {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(AliasLimitExtension(self.0))
    }
}

struct AliasLimitExtension(usize);

#[async_trait::async_trait]
impl Extension for AliasLimitExtension {
    async fn parse_query(
        &self,
        ctx: &ExtensionContext<'_>,
        query: &str,
        variables: &Variables,
        next: NextParseQuery<'_>,
    ) -> ServerResult<ExecutableDocument> {
        let document = next.run(ctx, query, variables).await?;
        let aliases = count_aliases(&document);
        if aliases > self.0 {
            return Err(ServerError::new(
                format!(
                    "the document has {aliases} aliased fields; at most {} are accepted",
                    self.0
                ),
                None,
            ));
        }
        Ok(document)
    }
}

/// Aliased fields in every operation and fragment definition of `document`.
pub fn count_aliases(document: &ExecutableDocument) -> usize {
    let operations = document
        .operations
        .iter()
        .map(|(_, operation)| in_selection(&operation.node.selection_set.node))
        .sum::<usize>();
    let fragments = document
        .fragments
        .values()
        .map(|fragment| in_selection(&fragment.node.selection_set.node))
        .sum::<usize>();
    operations + fragments
}

fn in_selection(set: &SelectionSet) -> usize {
    set.items
        .iter()
        .map(|item| match &item.node {
            Selection::Field(field) => {
                usize::from(field.node.alias.is_some())
                    + in_selection(&field.node.selection_set.node)
            }
            Selection::InlineFragment(fragment) => in_selection(&fragment.node.selection_set.node),
            Selection::FragmentSpread(_) => 0,
        })
        .sum()
}

/// Refuses documents that would hold more than this many fields once every
/// fragment spread is replaced by its fragment. Fragments that spread each
/// other twice per level make a document of a few hundred bytes stand for
/// billions of fields, and the depth and complexity checks that run after
/// parsing walk every one of them (minutes of CPU for one request). This
/// counts each fragment once, so it costs what the document's size does.
pub struct ExpansionLimit(pub usize);

impl ExtensionFactory for ExpansionLimit {
    fn create(&self) -> Arc<dyn Extension> {
        Arc::new(ExpansionLimitExtension(self.0))
    }
}

struct ExpansionLimitExtension(usize);

#[async_trait::async_trait]
impl Extension for ExpansionLimitExtension {
    /// Before anything else walks the document (async-graphql's recursion,
    /// depth and complexity checks all spread fragments out as they go): the
    /// document is parsed here, once, and handed on parsed.
    async fn prepare_request(
        &self,
        ctx: &ExtensionContext<'_>,
        mut request: Request,
        next: NextPrepareRequest<'_>,
    ) -> ServerResult<Request> {
        // A document that does not parse is reported by the usual path.
        if let Ok(document) = request.parsed_query()
            && expanded_fields(document) > self.0
        {
            return Err(ServerError::new(
                format!(
                    "the document's fragments expand to more than {} fields",
                    self.0
                ),
                None,
            ));
        }
        next.run(ctx, request).await
    }
}

/// Fragments spread inside each other deeper than this are refused as if
/// they expanded without bound (and the count never recurses deeper).
const MAX_FRAGMENT_NESTING: usize = 64;

/// The selections of every operation of `document` with its fragments
/// spread out; `usize::MAX` for a cycle, an unknown fragment or nesting
/// beyond [`MAX_FRAGMENT_NESTING`].
pub fn expanded_fields(document: &ExecutableDocument) -> usize {
    let mut expansion = Expansion {
        document,
        sizes: HashMap::new(),
        open: Vec::new(),
    };
    document
        .operations
        .iter()
        .map(|(_, operation)| expansion.of(&operation.node.selection_set.node))
        .fold(0, usize::saturating_add)
}

struct Expansion<'a> {
    document: &'a ExecutableDocument,
    /// Each fragment's expanded size, once known.
    sizes: HashMap<&'a str, usize>,
    /// The fragments being expanded, outermost first.
    open: Vec<&'a str>,
}

impl<'a> Expansion<'a> {
    /// Every selection counts, the spreads and inline fragments too: a
    /// document of spreads alone must not count as empty.
    fn of(&mut self, set: &'a SelectionSet) -> usize {
        let mut total = 0usize;
        for item in &set.items {
            let inside = match &item.node {
                Selection::Field(field) => self.of(&field.node.selection_set.node),
                Selection::InlineFragment(fragment) => self.of(&fragment.node.selection_set.node),
                Selection::FragmentSpread(spread) => self.fragment(&spread.node.fragment_name.node),
            };
            total = total.saturating_add(1).saturating_add(inside);
        }
        total
    }

    fn fragment(&mut self, name: &'a async_graphql::Name) -> usize {
        if let Some(&size) = self.sizes.get(name.as_str()) {
            return size;
        }
        if self.open.contains(&name.as_str()) || self.open.len() >= MAX_FRAGMENT_NESTING {
            return usize::MAX;
        }
        // Validation would refuse an unknown fragment, but async-graphql's
        // recursion check walks the spreads first: refuse it here.
        let Some(fragment) = self.document.fragments.get(name) else {
            return usize::MAX;
        };
        self.open.push(name.as_str());
        let size = self.of(&fragment.node.selection_set.node);
        self.open.pop();
        self.sizes.insert(name.as_str(), size);
        size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_are_counted_in_operations_fragments_and_nested_selections() {
        let document = async_graphql::parser::parse_query(
            "query { a: products { b: edges { cursor } } ...F ... on Query { c: eventLogHead } }
             fragment F on Query { d: eventLogHead e: eventLogHead products { edges { cursor } } }",
        )
        .unwrap();
        assert_eq!(count_aliases(&document), 5);
        let plain =
            async_graphql::parser::parse_query("{ products { edges { cursor } } }").unwrap();
        assert_eq!(count_aliases(&plain), 0);
    }

    #[test]
    fn fragments_are_counted_as_spread_out_each_expanded_once() {
        let parse = |text: &str| async_graphql::parser::parse_query(text).unwrap();
        // products, edges, cursor; then F twice (eventLogHead + products/edges/cursor).
        let document = parse(
            "{ products { edges { cursor } } ...F ... on Query { ...F } }
             fragment F on Query { eventLogHead products { edges { cursor } } }",
        );
        // Fields, spreads and the inline fragment each count once.
        assert_eq!(expanded_fields(&document), 3 + 3 + 2 * 4);
        // Two spreads per level, 40 levels: 2^40 fields, counted in a blink.
        let mut doubling = "{ ...F0 }".to_string();
        for level in 0..40 {
            doubling.push_str(&format!(
                " fragment F{level} on Query {{ ...F{next} ...F{next} }}",
                next = level + 1
            ));
        }
        doubling.push_str(" fragment F40 on Query { eventLogHead }");
        assert!(expanded_fields(&parse(&doubling)) > 1 << 40);
        // Spreads alone, ending in a fragment that does not exist.
        let mut unknown = "{ ...F0 }".to_string();
        for level in 0..31 {
            let next = format!("...F{}", level + 1);
            unknown.push_str(&format!(
                " fragment F{level} on Query {{ {next} {next} {next} {next} }}"
            ));
        }
        unknown.push_str(" fragment F31 on Query { ...Missing }");
        assert_eq!(expanded_fields(&parse(&unknown)), usize::MAX);
        // A cycle, and a chain deeper than the nesting bound, count as unbounded.
        let cycle = parse("{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }");
        assert_eq!(expanded_fields(&cycle), usize::MAX);
        let mut chain = "{ ...F0 }".to_string();
        for level in 0..100 {
            chain.push_str(&format!(
                " fragment F{level} on Query {{ ...F{} }}",
                level + 1
            ));
        }
        chain.push_str(" fragment F100 on Query { eventLogHead }");
        assert_eq!(expanded_fields(&parse(&chain)), usize::MAX);
    }
}
