"""Application metrics through `ray.util.metrics`: Ray's metrics agent exports them to Prometheus.

Prometheus names carry Ray's `ray_` prefix (counters also `_total`): ray_rayapp_images_scored_total,
ray_rayapp_score_bucket_total, ray_rayapp_rejections_total, ray_rayapp_preprocess_seconds_bucket,
ray_rayapp_model_seconds_bucket, ray_rayapp_batch_images_bucket, ray_rayapp_batch_requests_bucket.
deploy/grafana/rayapp_serve_dashboard.json charts them next to Serve's own series (replica health, queues, HTTP
status codes).
"""
from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# ImageReward rewards sit in about [-3, 3], CLIP/BLIP cosines in [0, 0.5], Aesthetic in [0, 10].
SCORE_BOUNDARIES = [-4, -3, -2.5, -2, -1.5, -1, -0.5, -0.25, 0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 4,
                    5, 6, 7, 8, 10]
SECONDS_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
_BOUNDS = np.asarray(SCORE_BOUNDARIES, dtype=np.float64)
_LABELS = [f"{b:g}" for b in SCORE_BOUNDARIES] + ["+Inf"]
REJECTION_REASONS = ("size", "count", "pixels", "decode", "prompt", "format", "model", "auth", "overload")

_METRICS: ServeMetrics | None = None


class ServeMetrics:
    """The application's counters and histograms, tagged by model, route or rejection reason."""

    def __init__(self, application: str):
        from ray.util.metrics import Counter, Histogram

        self.application = application
        app = ("application",)
        self.images_scored = Counter("rayapp_images_scored", description="Images scored, per model.",
                                     tag_keys=app + ("model",))
        # Ray's Histogram takes only positive boundaries and rewards are negative as often as not, so the score
        # distribution is a cumulative counter per upper bound `le`: Prometheus' histogram_quantile reads it as is.
        self.score_buckets = Counter("rayapp_score_bucket", description="Scores returned that are <= le, per model "
                                     "(cumulative buckets of the score distribution).", tag_keys=app + ("model", "le"))
        self.rejections = Counter("rayapp_rejections", description="Requests refused with a 4xx (or a 503: "
                                  "reason overload), by reason and route.",
                                  tag_keys=app + ("reason", "route"))
        self.preprocess_seconds = Histogram(
            "rayapp_preprocess_seconds", description="Ingress time to read, validate, decode and resize a request's "
            "images.", boundaries=SECONDS_BOUNDARIES, tag_keys=app + ("route",))
        self.model_seconds = Histogram("rayapp_model_seconds", description="Model forward time per batch, per model.",
                                       boundaries=SECONDS_BOUNDARIES, tag_keys=app + ("model",))
        self.batch_images = Histogram("rayapp_batch_images", description="Images per model forward pass.",
                                      boundaries=SIZE_BOUNDARIES, tag_keys=app + ("model",))
        self.batch_requests = Histogram("rayapp_batch_requests", description="Requests merged into one forward pass.",
                                        boundaries=SIZE_BOUNDARIES, tag_keys=app + ("model",))

    def _tags(self, **tags: str) -> dict:
        return {"application": self.application, **tags}

    def observe_batch(self, model: str, scores: list[float], requests: int, seconds: float) -> None:
        """One forward pass: its size, the requests it merged, its time, and every score it produced."""
        tags = self._tags(model=model)
        self.batch_images.observe(len(scores), tags=tags)
        self.batch_requests.observe(requests, tags=tags)
        self.model_seconds.observe(seconds, tags=tags)
        self.images_scored.inc(len(scores), tags=tags)
        # One increment per bucket and batch, not per score.
        below = np.searchsorted(np.sort(np.asarray(scores, dtype=np.float64)), _BOUNDS, side="right")
        for label, count in zip(_LABELS, below.tolist() + [len(scores)]):
            if count:
                self.score_buckets.inc(count, tags={**tags, "le": label})

    def reject(self, reason: str, route: str) -> None:
        """A request refused before scoring."""
        self.rejections.inc(1, tags=self._tags(reason=reason if reason in REJECTION_REASONS else "format",
                                               route=route))

    def preprocessed(self, route: str, seconds: float) -> None:
        self.preprocess_seconds.observe(seconds, tags=self._tags(route=route))


def get_metrics() -> ServeMetrics:
    """The process's metrics (one replica per process), tagged with its Serve application."""
    global _METRICS
    if _METRICS is None:
        application = ""
        try:
            from ray import serve

            application = serve.get_replica_context().app_name
        except Exception:  # noqa: BLE001 -- outside a replica (unit use) there is no application
            logger.debug("no Serve replica context; metrics carry an empty application tag")
        _METRICS = ServeMetrics(application)
    return _METRICS
