"""Image-text similarity scoring at scale: scores, shard bookkeeping, statistics, curation, reports."""
