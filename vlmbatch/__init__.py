"""vlmbatch: batched PaliGemma inference over image collections, written to Parquet, and evaluated."""

__version__ = "0.1.0"
