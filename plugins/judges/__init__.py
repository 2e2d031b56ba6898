"""The built-in judges: `llm` (a pairwise judge that asks the node's own model) and `reference`
(for requests whose right answer is known)."""
