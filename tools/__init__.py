"""Command-line tools that work against the running services (catalog indexing, categorisation, benchmarks)."""
