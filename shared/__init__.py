"""What both stages use; imports neither stage.

- ``sam_models``   build Meta's SAM modules without torchvision; official and random checkpoints
- ``transforms``   Meta's preprocessing and coordinate frames as pure functions
- ``views``        pure: augmented views (hflip, vflip, rot90) of images, masks, points, boxes
- ``hashing``      streamed sha256 of files
- ``storage``      local path or fsspec URL of a cache; the one-writer lock
- ``cache_format`` the cache contract as code: names, manifest schema, attributes (no I/O)
- ``cache_io``     create/open a cache, write embeddings, commit and read the manifest
- ``dask_cluster`` the Dask client of a command: its own LocalCluster or a given scheduler
"""
