"""m3w pipeline."""
