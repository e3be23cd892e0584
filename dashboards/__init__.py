"""Reports, Grafana dashboards and Prometheus rules (built in a later issue)."""
