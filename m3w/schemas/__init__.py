"""On-disk contracts of every m3w stage: one module per format, each with a schema version.

Every output written by a stage carries its schema version (parquet key-value metadata, a JSON field, or a
manifest line), so readers can refuse a format they do not understand.
"""
