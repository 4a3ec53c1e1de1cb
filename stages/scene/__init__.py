"""Scene-graph helpers the stages share: the graph and its queries, the lexicon, geometry, box
conventions, templates, task taxonomies, deterministic keys, table <-> graph records."""
