"""On-disk shield databases: safetensors shards, JSON manifest, FAISS index, exact range search."""
