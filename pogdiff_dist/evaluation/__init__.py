"""Evaluation of an exported model (METHOD.md, "Evaluation"): generate "An image of
{name}." for every identity with DDIM and fixed per-identity seeds, then, per identity and
in the feature space of a pluggable image encoder, FID, DINO score, gRecall and identity
accuracy, each averaged over all and over few-shot identities. Settings: ``Config.eval``
(:class:`pogdiff_dist.config.EvalConfig`).

Modules, in data-flow order:

- ``generate``: per-identity generation, in this process or on Ray actors (GPUs when given, in
  the training run's compute dtype), and the Ray actor that scores (``score_distributed``)
- ``features``: image encoders and the real (training, held-out) images, streamed
- ``judges``: the identity classifiers (the datasets' CNNs, nearest centroid)
- ``metrics``: the pure metric math (FID, DINO score, gRecall, accuracy, averaging)
- ``bleed``: identity bleed from the judge's predictions (confusion matrix, each identity's
  top wrong judged identity, the pairs with the most bleed)
- ``scoring``: generated + real images -> every metric, per identity and averaged (``Scorer``:
  references decoded and encoded batch by batch on one device; the driver gets numbers back)
- ``report``: metrics.json, images, grids, the metric-vs-frequency plot, the confusion matrix,
  the printed summary
- ``evaluate``: what to evaluate (``resolve_source``) and with which settings (``eval_settings``:
  a run's model with its run's), :func:`evaluate_model` (one process),
  :func:`run_evaluate` (Ray)
"""
