"""Benchmarks (COCO and Flickr30K captions, VQAv2), predictions, and their metrics."""
