"""The rows a job writes: their columns and the columns that key them.

Every column added after the first release is nullable, so an older output still opens (its rows read
as null there). The SigLIP score columns are in every caption output, null until `vlmbatch score` (or
`caption --score-with`) fills them in, so a caption run and a score run write one schema.
"""

from __future__ import annotations

import pyarrow as pa

_COMMON_FIELDS = [
    pa.field("error", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("num_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("image_version", pa.string()),  # the image file's "<size>:<mtime_ns>" when read (records.file_version)
    pa.field("mean_logprob", pa.float32()),  # the generated tokens' mean natural log-prob (a beam: its score)
    pa.field("min_logprob", pa.float32()),  # the least likely generated token's
]
SCORE_FIELDS = [
    pa.field("siglip_prob", pa.float32()),  # sigmoid(exp(logit_scale) * cos + logit_bias): a match probability
    pa.field("siglip_cos", pa.float32()),  # cosine of the image and text embeddings
    pa.field("siglip_weights", pa.string()),  # fingerprint of the SigLIP weights that scored the row
]
SCORE_COLUMNS = tuple(field.name for field in SCORE_FIELDS)
CAPTION_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("caption", pa.string()), *_COMMON_FIELDS,
                            *SCORE_FIELDS,
                            pa.field("lang", pa.string()),  # with --lang: the caption's language; else null
                            pa.field("flags", pa.list_(pa.string()))])  # the alt-text rules it breaks (review.rules)
VQA_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("question_id", pa.string()),
                        pa.field("question", pa.string()), pa.field("answer", pa.string()), *_COMMON_FIELDS])
KEYS = {"caption": ("id", "lang"), "vqa": ("id", "question_id")}  # an output without lang: (id, null)
SCHEMAS = {"caption": CAPTION_SCHEMA, "vqa": VQA_SCHEMA}
FAILURE_COLUMN, VERSION_COLUMN = "error", "image_version"
