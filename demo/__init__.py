"""`make demo`: a synthetic web (`demo.web`) and the end-to-end run over it (`demo.run`)."""
