"""jaxlm."""
