"""POST /v1/embeddings: routes (thin) · protocol (wire types) · service (inputs -> engine -> vectors)."""
