"""The sidecar service: the HTTP API (`api`, `routes`, `health`), the OpenAI-compatible proxy
and its tee (`proxy`, `tee`, `answers`, `chat`, `image_fetch`), ingest (`ingest`, `images`,
`canonical`, `sampling`), the audit workers (`worker`, `auditor`, `supervisor`, `children`), the
scheduler (`scheduler`, `reports`, `alert_delivery`, `webhooks`), metrics and OpenTelemetry
export, all built from one `runtime.Runtime`.

Importing a module here loads no model code: audits run in the supervised child processes."""
