"""Data: prepared-shard discovery, subsets in curation order, Ray Data crop pipelines."""
