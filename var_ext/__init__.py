"""DDO inside FoundationVision/VAR's trainer (`python -m var_ext.train`)."""
