"""Where images come from: folders, image files, manifests, saved and Hub datasets, VQA questions;
the record types, and image decoding. Knows nothing of models."""
