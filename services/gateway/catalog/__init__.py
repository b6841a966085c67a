"""The shared product catalog: PostgreSQL + pgvector behind SearchSimilar, IndexProduct and friends."""
