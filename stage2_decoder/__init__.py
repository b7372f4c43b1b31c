"""Stage 2 (`decoder`): train, evaluate and export SAM's mask decoder from a samcache cache.

Never builds the image encoder; meets stage 1 only through the cache format in ``shared``.

- ``config``        TrainConfig, the frozen config of `decoder train` (stored in checkpoints)
- ``dataset``       the cache's splits and deterministic per-step object batches (DataLoader)
- ``view_targets``  pure: an object's target, void region and box in a stored view
- ``prompts``       pure: points, noisy boxes, error-region clicks, RITM evaluation clicks
- ``model``         PromptableDecoder: Meta's prompt encoder + mask decoder, batched over objects
- ``losses``        pure: focal/BCE + dice + IoU-head MSE, lowest-loss mask of multimask outputs
- ``metrics``       pure: IoU with ignore regions, NoC, mIoU at k clicks
- ``step``          one SAM interactive training step (first prompt, clicks, mask-only passes)
- ``schedule``      pure learning-rate schedule (warm-up + cosine)
- ``setup``         checkpoint lookup, model building, optimizer, device/precision, distributed
- ``train``         the training loop (lr, eval, checkpoint, forward/backward, step, log)
- ``validate``      validation loss and mIoU (1 click, box) at the original resolution
- ``checkpoints``   atomic checkpoints, RNG state, metrics.jsonl sink
- ``guards``        run-folder lock, half-written caches, export never over an input
- ``plots``         training curves PNG
- ``evaluate``      click and box protocols, per-object results (`decoder eval`)
- ``eval_report``   metrics.json, CSV, Markdown table and plot of an evaluation
- ``predict``       masks, overlays and COCO RLE results from prompts (`decoder predict`)
- ``prompt_files``  prompts JSON, COCO detection results, ground-truth prompts; safe names
- ``amg``           automatic mask generation from the cached embedding (`decoder amg`)
- ``export``        run loading; Meta-format, decoder-only and ONNX exports (`decoder export`)
- ``visualize``     overlays, side-by-side panels, mIoU-vs-clicks plot
- ``interactive``   clicks to masks on one cached image, uncertainty for "label next"
- ``labels_store``  the COCO labels file of `decoder serve`, edited by locked operations
- ``serve_io``      request parsing and mask/image encoding of `decoder serve`
- ``serve``         the labelling page's Starlette app (`decoder serve`; page in ``static/``)
- ``sweep_config``  SweepConfig of `decoder sweep`: grid / random trials of train options
- ``sweep_board``   a sweep's leaderboard, report, plot, best link; the median early-stop rule
- ``sweep``         `decoder sweep`: trials as Dask tasks, resumable (trial.json per trial)
- ``cli``           the `decoder` typer app (``cli_inference``, ``cli_sweep``: more commands)
"""
