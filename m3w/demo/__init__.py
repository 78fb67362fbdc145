"""`make demo`: a synthetic web (`m3w.demo.web`) and the end-to-end run over it (`m3w.demo.run`)."""
