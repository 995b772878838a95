"""From a trained model to production: the gate, provenance, registry versions, rollback and deploy."""
