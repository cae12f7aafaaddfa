"""What the source readers share: paths on any fsspec filesystem (``fs``), line ranges of text files
(``lines``), the streamed index of a JSON array (``jsonscan``) and the range reader built on them
(``ranged``). The registered readers live in ``stages/readers/sources.py`` and ``stages/readers/sources_json.py``."""
