"""Arrow types of the core columns (names are part of the data contract: add, never rename)."""
import pyarrow as pa

ROWS_SCHEMA = pa.schema([
    ("image_id", pa.string()),  # stable across re-runs: the source's own key
    ("image", pa.string()),  # path or URI, or null when the bytes are inline
    ("image_bytes", pa.binary()),  # encoded image, or null when `image` points at it
    ("captions", pa.list_(pa.string())),
])
TAG_EVENT = pa.struct([
    ("tag_id", pa.int32()), ("stage", pa.string()), ("action", pa.string()), ("reason", pa.string()),
    ("score", pa.float32()), ("evidence", pa.string()),
])
# The evidence step's items (list<struct> columns): a tag's score, with its own threshold in tag_scores
TAG_SCORE = pa.struct([("tag_id", pa.int32()), ("score", pa.float32())])
PSEUDO_SCORE = pa.struct([("tag_id", pa.int32()), ("score", pa.float32()), ("threshold", pa.float32())])
REGION = pa.struct([("tag_id", pa.int32()), ("box", pa.list_(pa.float32(), 4)), ("score", pa.float32()),
                    ("backend", pa.string())])
REGION_EMBED = pa.struct([("tag_id", pa.int32()), ("embedding", pa.list_(pa.float16()))])
