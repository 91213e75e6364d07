"""Build tests/data/index-v2: an index written by mmsearch before migration 0003 (schema 0002_root_options_ignored).

Run once, from a checkout of that release (main at commit 3a84e92), to make the fixture that
tests/test_filters.py migrates: `python tests/data/make_index_v2.py`. It is made as index-v1 was
(see make_index_v1.py: six demo images and a four-line caption file, here copied to
/tmp/mmsearch-index-v2, indexed with shapes-mini, plus `expected.json`).
"""

from __future__ import annotations

from make_index_v1 import build

if __name__ == "__main__":
    build("index-v2")
