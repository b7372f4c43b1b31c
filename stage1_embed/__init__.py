"""Stage 1 (`embed`): encode each image once into a samcache cache.

- ``config``      EmbedConfig and LabelsConfig, the frozen configs of `embed run` / `labels`
- ``sources``     find images, detect the VOC layout, --masks and --coco annotations
- ``images``      read an image robustly (EXIF, modes, bad files) and hash it
- ``annotations`` masks → objects (RLE in the original and 256 target frames), void regions
- ``encoder``     the batched image encoder (bf16 on CPUs that have it, SDPA attention)
- ``pipeline``    plan (what is done, what is left), run batches locally or on Dask, commit
- ``relabel``     new objects on an existing embedding row (`embed run`, `embed labels`)
- ``compact``     `embed compact`: one manifest file, superseded rows dropped, rows freed
- ``status``      `embed status`: counts, failures, kinds of rows, when compaction pays
- ``verify``      check every row of a cache (chunks, checksums, shared rows, stray files)
- ``synthetic``   a synthetic VOC-layout dataset for the demo, tests and benchmarks
- ``cli``         the `embed` typer app: run, labels, compact, status, verify, demo-data
"""
