"""Ray Serve deployments and the HTTP API for routed inference."""
