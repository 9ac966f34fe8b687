"""LightningModules (orchestration only) and the pure flow math they share."""
