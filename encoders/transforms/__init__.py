"""Input transforms: one module per modality, pure CPU functions (bytes/path -> tensor)."""
