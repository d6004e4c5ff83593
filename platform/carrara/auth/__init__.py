"""API tokens, roles and the principal behind each request."""
