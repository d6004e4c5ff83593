"""The two scenarios `carrara demo` runs through the public API: card fraud and patient vitals."""
