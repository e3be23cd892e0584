"""The guardrail's own HTTP routes, one module per resource (samples, audits, reports; what
they share in `common`).  `guardrail.service.api.create_app` composes them with the health
routes, the metrics and the proxy."""
