"""m3w trainer."""
