"""Column names, statuses and reasons shared by every stage: the lake's vocabulary in one place."""

from __future__ import annotations

# Partition identity columns carried by every per-partition table.
CRAWL = "crawl"
SEGMENT = "segment"

# pairs
UID = "uid"
URL = "url"
TEXT = "text"
PAGE_URL = "page_url"
LANGUAGE = "language"
LANGUAGE_SCORE = "language_score"
WAT_FILE = "wat_file"
WAT_RECORD = "wat_record"
WARC_DATE = "warc_date"

PAIRS_COLUMNS = (UID, URL, TEXT, PAGE_URL, LANGUAGE, LANGUAGE_SCORE, CRAWL, SEGMENT, WAT_FILE, WAT_RECORD, WARC_DATE)

# downloads
STATUS = "status"
ERROR = "error"
HTTP_STATUS = "http_status"
FINAL_URL = "final_url"
ORIGINAL_WIDTH = "original_width"
ORIGINAL_HEIGHT = "original_height"
WIDTH = "width"
HEIGHT = "height"
SHA256 = "sha256"
MD5 = "md5"  # of the downloaded original bytes, as sha256 (takedown hash lists often use md5)
SHARD = "shard"
KEY = "key"
REASON = "reason"

STATUS_SUCCESS = "success"
STATUS_FAILED_DOWNLOAD = "failed_to_download"
STATUS_FAILED_RESIZE = "failed_to_resize"
STATUS_BLOCKED = "blocked"
# downloads reasons that make a row `blocked` (every other reason is a failure): our SSRF policy, and the
# site's own refusals (X-Robots-Tag, robots.txt, the TDMRep header; curation.consent)
REASON_SSRF_BLOCKED = "ssrf_blocked"
REASON_X_ROBOTS_TAG = "x_robots_tag"
REASON_ROBOTS_TXT = "robots_txt"
REASON_TDM_RESERVATION = "tdm_reservation"
BLOCKED_REASONS = (REASON_SSRF_BLOCKED, REASON_X_ROBOTS_TAG, REASON_ROBOTS_TXT, REASON_TDM_RESERVATION)
# Takedowns (curation.blocklist, curation.takedowns): a row blocked before its fetch, or an image refused on its
# hash, is `blocked` with reason `takedown:<list>`; a row already in the lake when a list matched it becomes
# `taken_down` (downloads and clip), its URL, caption, scores, embedding and image bytes removed.
REASON_TAKEDOWN_PREFIX = "takedown:"
STATUS_TAKEN_DOWN = "taken_down"

# Extraction drop reasons, counted per WAT file (LAION rules plus our input-integrity reasons).
DROP_NOT_IMAGE_LINK = "not_img_src"
DROP_DATA_URI = "data_uri"
DROP_JAVASCRIPT = "javascript_uri"
DROP_SCHEME = "unsupported_scheme"
DROP_SVG = "svg"
DROP_GIF = "gif"
DROP_URL_TOO_LONG = "url_too_long"
DROP_BAD_HOST = "bad_host"
DROP_SHORT_ALT = "short_alt"
DROP_DUPLICATE = "duplicate_in_partition"
DROP_SEEN_BEFORE = "seen_in_earlier_partition"
BAD_GZIP_MEMBER = "corrupt_gzip_member"
BAD_JSON = "malformed_json"
BAD_ENCODING = "non_utf8"
BAD_RECORD = "malformed_record"
TRUNCATED_FILE = "truncated_file"
DROP_BLOCKED_URL = "blocked_url_substring"  # a configured blocked substring other than .svg/.gif
# Hostile input that must end as a count, never as an exception.
JSON_TOO_DEEP = "json_too_deep"  # JSON nested deeper than the interpreter's recursion limit
RECORD_TOO_LARGE = "record_too_large"  # a gzip member inflating to (or spanning) more than the configured cap
DROP_EMPTY_SRC = "empty_src"  # `<img src="">` (or blank): it would resolve to the page itself
DROP_TAKEDOWN = "takedown"  # a pair a takedown list blocks (URL, host, uid or caption rule): never stored

# clip (one row per pair; `reason` is null for kept pairs)
SIMILARITY = "similarity"
KEEP = "keep"
LANGUAGE_THRESHOLD = "language_threshold"
PHASH = "phash"  # imagehash's pHash of the stored image, 64 bits as int64 (curation.phash.to_hex gives the hex)
STATUS_OK = "ok"
STATUS_FAILED_DECODE = "failed_to_decode"
STATUS_NOT_DOWNLOADED = "not_downloaded"
DROP_LOW_SIMILARITY = "low_similarity"
# clip: scores of the embedded images (null elsewhere) and the identity of what produced them
NSFW_TAG = "nsfw_tag"  # LAION-400M's zero-shot tag: UNLIKELY / UNSURE / NSFW (curation.safety)
PUNSAFE = "punsafe"
PWATERMARK = "pwatermark"
AESTHETIC = "aesthetic"
HEAD_KINDS = (PUNSAFE, PWATERMARK, AESTHETIC)  # each head's score column is named after its kind
HEAD_COLUMNS = {kind: f"{kind}_head" for kind in HEAD_KINDS}  # kind -> column holding that head's sha256
CLIP_MODEL = "clip_model"
CLIP_CHECKPOINT = "clip_checkpoint"
SCORE_COLUMNS = (NSFW_TAG, *HEAD_KINDS, CLIP_MODEL, CLIP_CHECKPOINT, *HEAD_COLUMNS.values())

# dedupe (one row per kept clip row; `reason` is null for survivors, else the strongest layer linking it)
CLUSTER_ID = "cluster_id"  # the survivor's uid
CLUSTER_SIZE = "cluster_size"
SURVIVOR = "survivor"
DUPLICATE_URL_TEXT = "duplicate_url_text"
DUPLICATE_BYTES = "duplicate_bytes"
NEAR_DUPLICATE_PHASH = "near_duplicate_phash"
NEAR_DUPLICATE_EMBEDDING = "near_duplicate_embedding"
DEDUPE_LAYERS = (DUPLICATE_URL_TEXT, DUPLICATE_BYTES, NEAR_DUPLICATE_PHASH, NEAR_DUPLICATE_EMBEDDING)  # strongest first

# The `kept` view (curation.sql) and subset releases name some columns for their readers.
CAPTION = "caption"  # pairs.text
CAPTION_SIMILARITY = "caption_similarity"  # search results: clip's stored image-caption `similarity`
SOURCE_SHARD = "source_shard"  # downloads.shard
SOURCE_KEY = "source_key"  # downloads.key

# Image files inside a webdataset sample, in the order a reader looks for them (img2dataset's encode formats).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
