"""Few-shot in-context evaluation: data loaders, prompts, support selection and metrics (see trainer.evaluate)."""
