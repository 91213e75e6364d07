"""Build tests/data/index-v3: an index written by mmsearch before migration 0004 (schema 0003_file_metadata).

Run once, from a checkout of that release (main at commit cb13f03), to make the fixture that the
migrations after 0003 are tested on: `python tests/data/make_index_v3.py`. It is made as index-v1
was (see make_index_v1.py: six demo images and a four-line caption file, here copied to
/tmp/mmsearch-index-v3, indexed with shapes-mini, plus `expected.json`).
"""

from __future__ import annotations

from make_index_v1 import build

if __name__ == "__main__":
    build("index-v3")
