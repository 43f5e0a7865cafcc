"""DDO inside NVlabs/edm2's own training loop (`python -m edm2_ext.train`)."""
