"""Similar-product search: the gateway's vector index of catalog embeddings (index, persistence, RPC glue)."""
