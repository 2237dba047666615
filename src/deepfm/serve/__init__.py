"""``deepfm serve``: an HTTP JSON API over a model directory (see ``deepfm.serve.app`` and docs/serving.md)."""
