"""m3w model."""
