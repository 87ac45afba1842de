"""otaflow: a firmware release pipeline on Temporal."""
