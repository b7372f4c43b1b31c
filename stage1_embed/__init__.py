"""Stage 1 (`embed`): encode each image once into a samcache cache.

- ``config``      EmbedConfig, the frozen config of `embed run`
- ``sources``     find images, detect the VOC layout, --masks and --coco annotations
- ``images``      read an image robustly (EXIF, modes, bad files) and hash it
- ``annotations`` masks → objects (RLE in the original and 256 target frames), void regions
- ``encoder``     the batched image encoder (bf16 on CPUs that have it, SDPA attention)
- ``pipeline``    plan (what is done, what is left), run batches locally or on Dask, commit
- ``verify``      check every row of a cache (chunks, checksums, shared rows, stray files)
- ``synthetic``   a synthetic VOC-layout dataset for the demo, tests and benchmarks
- ``cli``         the `embed` typer app: run, status, verify, demo-data
"""
