"""Outside services: run storage (local / S3) and experiment tracking (MLflow)."""
