//! Bounds a GraphQL document must stay within beyond async-graphql's own
//! depth and complexity limits (set in [`super::build_schema`]).

use std::sync::Arc;

use async_graphql::extensions::{Extension, ExtensionContext, ExtensionFactory, NextParseQuery};
use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};
use async_graphql::{ServerError, ServerResult, Variables};

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
}
